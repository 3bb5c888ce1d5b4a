"""Data parallelism over the 8 CPU devices that conftest.py makes."""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
from numerics import EPS, assert_same_function, relative

from cnn_jax import predictor, steps, train
from cnn_jax.config import Config as _Config

# CPU devices wherever the suite runs (conftest.py); tests marked gpu are about the accelerator.
Config = functools.partial(_Config, platform="cpu")


def test_there_are_8_cpu_devices():
    assert len(jax.devices("cpu")) == 8


def _steps(tiny, devices, count, dropout, tx=None):
    """(params before, params after, state) after `count` steps on the first 256 tiny images."""
    trainer, state = steps.create_trainer(Config(devices=devices, dropout=dropout), 43)
    if tx is not None:
        trainer = dataclasses.replace(trainer, tx=tx)
        state = trainer.place(trainer.init_state(state.params))
    before = [np.asarray(p) for p in jax.tree.leaves(state.params)]
    images, labels, order = trainer.place((tiny.images[:256], tiny.labels[:256], np.arange(256)))
    for i in range(count):
        state = trainer.train_step(state, images, labels, order, 256, i, 0)
    if devices > 1:
        assert state.params["conv1"]["kernel"][...].sharding.num_devices == devices
    return before, [np.asarray(p) for p in jax.tree.leaves(state.params)], state


@pytest.mark.parametrize("dropout", [0.5, 0.0])
def test_8_devices_compute_the_gradient_of_1_device(tiny, dropout):
    """One SGD step with learning rate 1 moves the parameters by minus the gradient.

    Eight devices sum their shards' gradients where one device sums the whole batch: the same
    float32 sums in another order, which the arithmetic promises to about sqrt(terms) * 6e-8
    of each gradient's size (up to 25,088 terms here: ~1e-5; measured 1.7e-7 on a Xeon). A
    gradient taken from one shard only, or not summed across devices, is off by order 1.
    """
    p0, one, _ = _steps(tiny, 1, 1, dropout, optax.sgd(1.0))
    _, eight, _ = _steps(tiny, 8, 1, dropout, optax.sgd(1.0))
    for start, a, b in zip(p0, one, eight, strict=True):
        assert relative(start - a, start - b, start - a) < 1e-4


@pytest.mark.parametrize("dropout", [0.5, 0.0])
def test_8_devices_train_like_1_device_over_several_steps(tiny, dropout):
    """Five Adam steps: the weights stay close relative to how far they moved.

    Not entry by entry: Adam divides each gradient by its own size, so an entry whose gradient
    is rounding noise moves a whole learning rate either way (seen: 3.7e-4 apart on an AVX2-only
    CPU, 1.9e-7 on an AVX-512 one). Such entries are few, so the norm of the difference stays
    a small fraction of the norm of the update.
    """
    p0, one, s1 = _steps(tiny, 1, 5, dropout)
    _, eight, s8 = _steps(tiny, 8, 5, dropout)
    for start, a, b in zip(p0, one, eight, strict=True):
        assert relative(a, b, a - start) < 1e-2
    np.testing.assert_allclose(s1.metrics, s8.metrics, rtol=1e-4)


def test_calls_on_several_cpu_devices_return_finished(tiny):
    """Queued multi-device CPU calls could deadlock in XLA's all-reduce (Trainer._compiled)."""
    trainer, state = steps.create_trainer(Config(devices=8), 43)
    images, labels, order = trainer.place((tiny.images[:64], tiny.labels[:64], np.arange(64)))
    state = trainer.train_step(state, images, labels, order, 64, 0, 0)
    assert state.metrics.is_ready() and state.params["conv1"]["bias"][...].is_ready()
    eval_order = trainer.place(predictor.padded_order(np.arange(64), trainer.predictor.eval_batch))
    sums, _, _ = trainer.predictor.eval_step(state.params, images, labels, eval_order, 64, 0)
    assert sums.is_ready()


def test_batches_that_do_not_divide_are_errors():
    with pytest.raises(ValueError, match="batch size 32 does not divide over 3 devices"):
        steps.create_trainer(Config(devices=3), 43)
    with pytest.raises(ValueError, match="--devices 9: this machine has 8"):
        steps.create_trainer(Config(devices=9), 43)


def test_evaluation_on_8_devices_counts_every_image(tiny):
    trainer, state = steps.create_trainer(Config(devices=8), 43)
    ev = predictor.evaluate(trainer.predictor, state.params, tiny.images[:333], tiny.labels[:333])
    ref_trainer, ref_state = steps.create_trainer(Config(devices=1), 43)
    ref = predictor.evaluate(
        ref_trainer.predictor, ref_state.params, tiny.images[:333], tiny.labels[:333]
    )
    assert ev["n"] == 333 and trainer.predictor.eval_batch % 8 == 0
    assert ev["accuracy"] == ref["accuracy"]
    # The mean of 333 positive per-image losses summed in another order: within 333·eps of
    # it (numerics.py); as much again for the per-image losses, whose forward passes XLA may
    # block differently for another batch size (each layer's rounding is far below that).
    assert ev["loss"] == pytest.approx(ref["loss"], rel=2 * 333 * EPS)


@pytest.mark.parametrize("first, then", [(8, 1), (1, 8)])
def test_checkpoints_move_between_device_counts(tiny, tmp_path, first, then):
    cfg = Config(epochs=2, devices=first)
    stop = iter(range(100))  # fit polls once before the first call
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


def test_probabilities_split_any_batch_over_the_devices_and_come_back_whole(tiny):
    """`cnn-jax predict` and `evaluate`'s classifying: each device takes a slice of a batch of
    any size (padded to the device count), and every device holds the whole answer, the one
    device's (numerics.py: the same function, computed at other batch sizes)."""
    trainer, state = steps.create_trainer(Config(devices=8, ensemble=2), 43)
    one, one_state = steps.create_trainer(Config(devices=1, ensemble=2), 43)
    for n in (1, 13, 16):
        images = tiny.images[:n]
        probs = trainer.predictor.probabilities(state.weights, images)
        each = trainer.predictor.member_probabilities(state.weights, images)
        assert probs.shape == (n, 43) and each.shape == (2, n, 43)
        assert probs.sharding.is_fully_replicated and each.sharding.is_fully_replicated
        ref = one.predictor.probabilities(one_state.weights, images)
        assert_same_function(np.log(probs), np.log(ref), f"{n} images")
        assert_same_function(each.mean(0), probs, "the members' mean")
    # Each device computes an eighth of the batch (replicated, each would compute all of it).
    flops = [
        t.predictor.probabilities.lower(w, tiny.images[:16]).compile().cost_analysis()["flops"]
        for t, w in ((trainer, state.weights), (one, one_state.weights))
    ]
    assert flops[0] < flops[1] / 4
