"""The training loop's callbacks, each alone, and fit with callbacks of a user's own."""

import functools

import numpy as np
import pytest

from cnn_jax import callbacks as cb
from cnn_jax import report, run_store, train
from cnn_jax.callbacks import Diverged
from cnn_jax.config import Config as _Config

Config = functools.partial(_Config, platform="cpu", devices=1)


class _State:
    def __init__(self, loss_sum, correct, count):
        self.metrics = np.array([loss_sum, correct, count], np.float32)


class _Scalars:
    def __init__(self):
        self.points = []

    def add(self, step, **values):
        self.points.append((step, values))


def _loop(**kw):
    return cb.Loop(Config(**kw.pop("config", {})), trainer=None, steps_per_epoch=10, **kw)


def test_every_counts_multiples_crossed_by_a_call_of_many_steps():
    assert cb.every(10, 1, 5) and not cb.every(9, 1, 5)
    assert cb.every(12, 4, 5)  # steps 9..12 crossed 10
    assert not cb.every(12, 2, 5) and not cb.every(12, 4, None)


def test_step_scalars_are_means_of_the_steps_since_the_last_point():
    loop = _loop(scalars=_Scalars())
    scalars = cb.StepScalars(2, lambda step: 0.1)
    scalars.on_epoch_begin(loop, 0)
    scalars.on_calls_end(loop, 0, 1, _State(4.0, 1, 2))  # step 1: not yet
    scalars.on_calls_end(loop, 1, 2, _State(6.0, 2, 4))  # step 2: steps 1-2
    scalars.on_calls_end(loop, 2, 4, _State(6.5, 6, 8))  # step 4: steps 3-4 alone
    (s2, first), (s4, second) = loop.scalars.points
    assert (s2, s4) == (2, 4)
    assert first["steps/train_loss"] == pytest.approx(1.5)
    assert second["steps/train_loss"] == pytest.approx(0.125)  # not the epoch's 6.5 / 8
    assert second["steps/train_accuracy"] == pytest.approx(1.0)
    assert second["steps/learning_rate"] == 0.1


def test_the_divergence_guard_stops_on_a_loss_that_is_not_a_number():
    loop = _loop()
    cb.DivergenceGuard().on_calls_end(loop, 0, 1, _State(1.0, 1, 2))
    with pytest.raises(Diverged, match="became nan by step 3"):
        cb.DivergenceGuard().on_calls_end(loop, 2, 3, _State(np.nan, 1, 2))


def test_a_stop_request_interrupts_and_early_stopping_ends_the_run():
    loop = _loop()
    cb.StopOnRequest(lambda: False).on_calls_end(loop, 0, 1, None)
    assert not loop.interrupted
    cb.StopOnRequest(lambda: True).on_calls_end(loop, 0, 1, None)
    assert loop.interrupted
    loop, stop = _loop(), cb.EarlyStopping("val_accuracy", patience=2)
    for epoch, acc in enumerate([0.5, 0.6, 0.6, 0.55]):
        stop.on_epoch_end(loop, epoch, {"val_accuracy": acc}, None)
    assert loop.stop_training and stop.best == 0.6


def test_the_stuck_warning_is_said_once(capsys):
    loop, prior = _loop(config={"pixels": "raw"}), float(np.log(43))
    warn = cb.StuckWarning(prior, None)
    warn.on_epoch_end(loop, 0, {"train_loss": 3.76}, None)
    assert warn.warning is None  # one epoch near the prior: a slow start
    loop.epochs.append({"train_loss": 3.76})
    warn.on_epoch_end(loop, 1, {"train_loss": 3.77}, None)
    warn.on_epoch_end(loop, 2, {"train_loss": 3.77}, None)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "--pixels unit" in warn.warning and "a lower --lr" in warn.warning


def test_a_users_callback_stops_the_run_early(tiny, tmp_path):
    seen = []

    class Watch(cb.Callback):
        def on_epoch_end(self, loop, epoch, record, state):
            seen.append(sorted(record))
            loop.stop_training = epoch == 1

    cfg = Config(epochs=5, val_size=0.2, synthetic_per_class=10, eval_every_epoch=True)
    _, metrics = train.fit(cfg, tiny, tmp_path, verbose=False, callbacks=[Watch()])
    assert len(metrics["epochs"]) == 2 and metrics["selected_epoch"] in (1, 2)
    # Callbacks of the user's run after the built-in ones: the record is complete.
    assert "val_accuracy" in seen[0] and "test_accuracy" in seen[0]


def test_every_resource_is_closed_when_a_callback_raises(tiny, tmp_path, monkeypatch):
    closed = []
    for cls in (run_store.RunStore, report.Scalars):
        original = cls.close
        monkeypatch.setattr(cls, "close", lambda self, o=original, n=cls.__name__: (
            closed.append(n), o(self))[1])  # fmt: skip

    class Broken(cb.Callback):
        def on_calls_end(self, loop, begin, end, state):
            if loop.step(end) == 3:
                raise RuntimeError("a callback's bug")

    with pytest.raises(RuntimeError, match="a callback's bug"):
        train.fit(Config(epochs=2), tiny, tmp_path, verbose=False, callbacks=[Broken()])
    assert sorted(closed) == ["RunStore", "Scalars"]
    assert any(tmp_path.glob("events.out.tfevents.*"))
