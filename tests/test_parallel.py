"""Data parallelism over the 8 CPU devices that conftest.py makes."""

import jax
import numpy as np
import pytest

from cnn_jax import train
from cnn_jax.config import Config


def test_there_are_8_devices():
    assert len(jax.devices()) == 8


def _steps(tiny, devices, steps=5, dropout=0.5):
    trainer, state = train.create_trainer(Config(devices=devices, dropout=dropout), 43)
    images, labels = tiny.images[:256], tiny.labels[:256]
    order = np.arange(256, dtype=np.int32)
    images, labels, order = trainer.place((images, labels, order))
    for i in range(steps):
        state = trainer.train_step(state, images, labels, order, 256, i, 0)
    return state


@pytest.mark.parametrize("dropout", [0.5, 0.0])
def test_8_devices_equal_1_device_after_several_steps(tiny, dropout):
    one, eight = _steps(tiny, 1, dropout=dropout), _steps(tiny, 8, dropout=dropout)
    assert eight.params["conv1"]["kernel"][...].sharding.num_devices == 8
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params))
    )
    assert diff < 1e-5, diff
    np.testing.assert_allclose(one.metrics, eight.metrics, rtol=1e-5)


def test_calls_on_several_cpu_devices_return_finished(tiny):
    """Queued multi-device CPU calls could deadlock in XLA's all-reduce (Trainer._compiled)."""
    trainer, state = train.create_trainer(Config(devices=8), 43)
    images, labels, order = trainer.place((tiny.images[:64], tiny.labels[:64], np.arange(64)))
    state = trainer.train_step(state, images, labels, order, 64, 0, 0)
    assert state.metrics.is_ready() and state.params["conv1"]["bias"][...].is_ready()
    eval_order = trainer.place(train._padded(np.arange(64), trainer.eval_batch))
    sums, _ = trainer.eval_step(state.params, images, labels, eval_order, 64, 0)
    assert sums.is_ready()


def test_batches_that_do_not_divide_are_errors():
    with pytest.raises(ValueError, match="batch size 32 does not divide over 3 devices"):
        train.create_trainer(Config(devices=3), 43)
    with pytest.raises(ValueError, match="--devices 9: this machine has 8"):
        train.create_trainer(Config(devices=9), 43)


def test_evaluation_on_8_devices_counts_every_image(tiny):
    trainer, state = train.create_trainer(Config(devices=8), 43)
    ev = train.evaluate(trainer, state.params, tiny.images[:333], tiny.labels[:333])
    ref_trainer, ref_state = train.create_trainer(Config(devices=1), 43)
    ref = train.evaluate(ref_trainer, ref_state.params, tiny.images[:333], tiny.labels[:333])
    assert ev["n"] == 333 and trainer.eval_batch % 8 == 0
    assert ev["accuracy"] == ref["accuracy"]
    assert ev["loss"] == pytest.approx(ref["loss"], rel=1e-5)


@pytest.mark.parametrize("first, then", [(8, 1), (1, 8)])
def test_checkpoints_move_between_device_counts(tiny, tmp_path, first, then):
    cfg = Config(epochs=2, devices=first)
    stop = iter(range(1, 100))
    with pytest.raises(train.Interrupted):
        train.fit(cfg, tiny, tmp_path, verbose=False, should_stop=lambda: next(stop) == 5)
    state, m = train.fit(Config(epochs=2, devices=then), tiny, tmp_path, verbose=False)
    assert int(state.step) == 18 and len(m["epochs"]) == 2
    assert state.params["dense1"]["kernel"][...].sharding.num_devices == then
    ref, _ = train.fit(Config(epochs=2, devices=first), tiny, verbose=False)
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params))
    )
    assert diff < 1e-3, diff
