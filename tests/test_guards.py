"""Guard rails: options refused before loading, a NaN loss stops the run, a stuck run is named,
and every run leaves TensorBoard scalars."""

import json

import numpy as np
import pytest

from cnn_jax import callbacks, checkpoint, train
from cnn_jax.checkpoint import Checkpoints
from cnn_jax.cli import main
from cnn_jax.config import Config


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "--epochs must be at least 1, not 0"),
        (["--save-every", "0"], "--save-every must be at least 1, not 0"),
        (["--log-every", "-2"], "--log-every must be at least 1, not -2"),
        (["--image-size", "9"], "--image-size 9 is too small for --model 2: it needs at least 10"),
        (["--model", "3", "--image-size", "7"], "--image-size 7 is too small for --model 3"),
        (["--lr", "0"], "--lr must be above 0"),
        (["--ensemble", "0"], "--ensemble must be at least 1"),
        (["--val-size", "1"], "--val-size must be below 1"),
        (["--aug-rotate", "-5"], "--aug-rotate must be at least 0"),
        (["--stn"], "--stn is for --model 3 only, not --model 2"),
        (["--width", "1.5"], "--width is for --model 3 only, not --model 2"),
        (["--model", "3", "--width", "0"], "--width must be at least 0.25, not 0"),
        (["--augment", "--aug-blur", "2.5"], "--aug-blur must be at most 2, not 2.5"),
        (["--augment", "--aug-erase", "1.5"], "--aug-erase must be at most 1, not 1.5"),
        (["--augment", "--aug-elastic", "0.2"], "--aug-elastic must be at most 0.1, not 0.2"),
        (["--augment", "--aug-gamma", "-1"], "--aug-gamma must be at least 0, not -1"),
        (["--augment", "--aug-colour", "1"], "--aug-colour must be below 1, not 1"),
        (["--augment", "--aug-aspect", "1"], "--aug-aspect must be below 1, not 1"),
        (["--augment", "--aug-flip", "1.5"], "--aug-flip must be at most 1, not 1.5"),
        (["--augment", "--aug-cutmix", "-0.5"], "--aug-cutmix must be at least 0, not -0.5"),
    ],
)
def test_bad_options_are_refused_before_anything_loads(tmp_path, capsys, args, message):
    # The data argument does not exist: the error must be about the option, found first.
    code = main(["train", str(tmp_path / "missing"), *args, "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def test_a_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["train", "--pixels", "raw", "--lr", "1e25", "--synthetic-per-class", "10"]
    args += ["--save-every", "1", "--platform", "cpu", "--workdir", str(workdir)]
    code = main(args)
    err = capsys.readouterr().err
    assert code == callbacks.DIVERGED_EXIT == 3
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "the training loss became nan by step 2 (epoch 1, step 2 of 9)" in err
    assert f"the last good checkpoint is step 1 in {workdir / 'checkpoints'}" in err
    store = Checkpoints(workdir, read_only=True)
    assert store.steps() == [1]
    state = checkpoint.flatten(store.manager.restore(1)["state"])
    assert all(np.isfinite(v).all() for v in state.values())
    assert not (workdir / "metrics.json").exists()


def test_stuck_reasons():
    prior = callbacks.prior_entropy(np.repeat(np.arange(43), 10), 43)
    assert prior == pytest.approx(np.log(43))
    at_prior = [{"train_loss": prior + 0.01}, {"train_loss": prior - 0.02}]
    assert "class-prior entropy" in callbacks.stuck_reason(at_prior, prior)
    assert callbacks.stuck_reason(at_prior[:1], prior) is None  # one epoch: a slow start
    assert callbacks.stuck_reason([{"train_loss": 3.0}] * 2, prior) is None
    one_class = np.full(50, 7)
    assert "predicted as class 7" in callbacks.stuck_reason([{"train_loss": 1.0}], prior, one_class)
    assert callbacks.stuck_reason([{"train_loss": 1.0}], prior, np.arange(50) % 3) is None


def test_every_run_folder_gets_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = Config(
        epochs=2,
        synthetic_per_class=10,
        platform="cpu",
        devices=1,
        val_size=0.2,
        eval_every_epoch=True,
    )
    from cnn_jax.data.synthetic import make_synthetic

    _, metrics = train.fit(cfg, make_synthetic(10), tmp_path, verbose=False, log_every=2)
    events = EventAccumulator(str(tmp_path)).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train_loss", "train_accuracy", "val_accuracy", "test_loss", "test_accuracy",
                "images_per_second", "learning_rate"):  # fmt: skip
        assert f"epoch/{tag}" in tags, tags
    assert {"steps/train_loss", "steps/train_accuracy", "steps/learning_rate"} <= tags
    accuracy = events.Scalars("epoch/test_accuracy")
    assert [e.value for e in accuracy] == pytest.approx(
        [e["test_accuracy"] for e in metrics["epochs"]]
    )
    assert [e.step for e in events.Scalars("steps/train_loss")][:2] == [2, 4]


def test_metrics_json_of_a_run_is_strict_json(tmp_path):
    assert main(["train", "--epochs", "1", "--synthetic-per-class", "3", "--platform", "cpu",
                 "--workdir", str(tmp_path), "--quiet"]) == 0  # fmt: skip
    json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)
