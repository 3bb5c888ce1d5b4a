"""Checkpoints: exact resume, interruptions, corruption, and the commands that read them."""

import dataclasses
import functools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from conftest import start_cli

from cnn_jax import checkpoint, steps, train
from cnn_jax.checkpoint import CheckpointError, Checkpoints
from cnn_jax.cli import main
from cnn_jax.config import Config as _Config
from cnn_jax.data.synthetic import make_synthetic
from cnn_jax.run_meta import RunMeta

# CPU devices wherever the suite runs (conftest.py); tests marked gpu are about the accelerator.
Config = functools.partial(_Config, platform="cpu")

# One device, as the `cnn-jax` subprocesses below have. 516 train images: 17 steps per epoch.
CFG = Config(epochs=2, synthetic_per_class=20, devices=1, eval_every_epoch=True)


pytestmark = pytest.mark.xdist_group("checkpoint")  # module fixtures set up once (pyproject.toml)


@pytest.fixture(scope="module")
def small():
    return make_synthetic(CFG.synthetic_per_class)


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory):
    """An uninterrupted run: its final digest and metrics."""
    workdir = tmp_path_factory.mktemp("ref")
    state, metrics = train.fit(CFG, small, workdir, verbose=False)
    return checkpoint.params_digest(state.params), metrics, workdir


def _stop_at(call):
    """A stop request after the `call`-th compiled call (fit polls once before the first)."""
    polls = iter(range(10_000))
    return lambda: next(polls) == call


def _losses(metrics):
    return [(e["train_loss"], e["train_accuracy"], e["test_accuracy"]) for e in metrics["epochs"]]


@pytest.mark.parametrize("stop_step", [9, 17])  # mid-epoch 1, and at the end of epoch 1
def test_resume_is_bit_identical(small, reference, tmp_path, stop_step):
    digest, ref_metrics, _ = reference
    with pytest.raises(train.Interrupted, match=f"stopped at step {stop_step}"):
        train.fit(CFG, small, tmp_path, verbose=False, should_stop=_stop_at(stop_step))
    assert Checkpoints(tmp_path).steps()[-1] == stop_step
    state, metrics = train.fit(CFG, small, tmp_path, verbose=False)
    assert checkpoint.params_digest(state.params) == digest
    assert _losses(metrics) == _losses(ref_metrics)
    assert metrics["test_accuracy"] == ref_metrics["test_accuracy"]


def test_resume_with_many_steps_per_call_is_bit_identical(small, tmp_path):
    cfg = Config(epochs=2, synthetic_per_class=20, devices=1, steps_per_call=5)
    ref, ref_metrics = train.fit(cfg, small, verbose=False)
    # the second call ends at step 10, mid-epoch 1; --save-every 4 saves at steps 5 and 10
    with pytest.raises(train.Interrupted, match="stopped at step 10"):
        train.fit(cfg, small, tmp_path, verbose=False, save_every=4, should_stop=_stop_at(2))
    assert Checkpoints(tmp_path).steps() == [5, 10]
    state, metrics = train.fit(cfg, small, tmp_path, verbose=False)
    assert checkpoint.params_digest(state.params) == checkpoint.params_digest(ref.params)
    assert [e["train_loss"] for e in metrics["epochs"]] == [
        e["train_loss"] for e in ref_metrics["epochs"]
    ]


def test_keeps_latest_two_and_the_best_on_validation(small, tmp_path):
    cfg = Config(epochs=4, synthetic_per_class=20, val_size=0.2)
    _, metrics = train.fit(cfg, small, tmp_path, verbose=False, save_every=4)
    store = Checkpoints(tmp_path)
    best = store.best_step()
    accs = {s: store.read_meta(s).val_accuracy for s in store.steps()}
    spe = -(-metrics["n_train"] // 32)
    assert store.steps()[-2:] == [4 * spe - 4, 4 * spe]  # a --save-every save, the last epoch
    assert set(store.steps()) - {4 * spe - 4, 4 * spe} <= {best}
    assert accs[best] == max(a for a in accs.values() if a is not None)


def test_without_validation_no_checkpoint_is_picked_by_the_test_split(small, tmp_path):
    train.fit(Config(epochs=3, synthetic_per_class=20), small, tmp_path, verbose=False)
    store = Checkpoints(tmp_path)
    assert store.steps() == [34, 51] and store.best_step() == 51


def test_changing_a_setting_on_resume_names_it(small, tmp_path):
    with pytest.raises(train.Interrupted):
        train.fit(CFG, small, tmp_path, verbose=False, should_stop=_stop_at(3))
    with pytest.raises(ValueError, match="--model is 1 but the run"):
        train.fit(Config(model=1, epochs=2, synthetic_per_class=20), small, tmp_path, verbose=False)
    with pytest.raises(ValueError, match="--lr is 0.01 but the run .* used 0.001"):
        train.fit(dataclasses.replace(CFG, learning_rate=0.01), small, tmp_path, verbose=False)
    with pytest.raises(ValueError, match="--aug-shear is 0.3 but the run .* used 0.1"):
        train.fit(Config(**{**CFG.__dict__, "strengths": {"shear": 0.3}}), small, tmp_path,
                  verbose=False)  # fmt: skip
    other = make_synthetic(20, seed=7)
    with pytest.raises(ValueError, match="the data differs"):
        train.fit(CFG, other, tmp_path, verbose=False)
    # --restart starts over; more epochs than planned is a resume, not a change
    train.fit(CFG, small, tmp_path, verbose=False, restart=True)
    _, m = train.fit(Config(epochs=3, synthetic_per_class=20), small, tmp_path, verbose=False)
    assert len(m["epochs"]) == 3


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# Orbax leaves asyncio callbacks behind when a damaged file fails to read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_is_named_and_fallback_resumes(small, reference, tmp_path):
    digest, _, _ = reference
    with pytest.raises(train.Interrupted):
        train.fit(CFG, small, tmp_path, verbose=False, save_every=4, should_stop=_stop_at(10))
    assert Checkpoints(tmp_path).steps() == [8, 10]
    victim = _largest_file(tmp_path / "checkpoints" / "10" / "state")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="checkpoint step 10 .* corrupt"):
        train.fit(CFG, small, tmp_path, verbose=False)
    info = subprocess.run(
        [sys.executable, "-m", "cnn_jax", "info", str(tmp_path / "checkpoints" / "10")],
        capture_output=True,
        text=True,
    )
    assert info.returncode == 2 and "Traceback" not in info.stderr
    assert info.stderr.count("\n") == 1 and "step 10" in info.stderr
    state, _ = train.fit(CFG, small, tmp_path, verbose=False, resume_fallback=True)
    assert checkpoint.params_digest(state.params) == digest


def test_a_restore_failure_that_is_not_damage_moves_nothing(small, tmp_path, monkeypatch):
    """Only damaged files are set aside: an intact step that fails to restore (here orbax's
    restore raising as if a library upgrade had changed its interface) names itself and every
    step folder stays where it was, --resume-fallback or not."""
    import orbax.checkpoint as ocp

    with pytest.raises(train.Interrupted):
        train.fit(CFG, small, tmp_path, verbose=False, save_every=4, should_stop=_stop_at(10))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    calls = []

    def upgraded(self, *args, **kwargs):
        calls.append(args)
        raise TypeError("restore() got an unexpected keyword argument 'args'")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", upgraded)
    with pytest.raises(checkpoint.RestoreFailed, match="step 10 .* is intact .* nothing was moved"):
        train.fit(CFG, small, tmp_path, verbose=False, resume_fallback=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert not (tmp_path / "checkpoints-set-aside").exists()
    # The same failure on a damaged step is damage: one changed byte tells them apart.
    victim = _largest_file(tmp_path / "checkpoints" / "10" / "state")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    calls.clear()
    with pytest.raises(CheckpointError, match="step 10 .* corrupt .* does not match its SHA-256"):
        train.fit(CFG, small, tmp_path, verbose=False)
    # ...found before orbax reads it: orbax's failed reads leave asyncio tasks that print
    # tracebacks when collected, which once broke `info`'s one-line error.
    assert calls == []


def test_flipped_bytes_and_missing_items_are_detected(small, tmp_path):
    train.fit(Config(epochs=1, synthetic_per_class=20), small, tmp_path, verbose=False)
    store = Checkpoints(tmp_path)
    _, template = steps.create_trainer(CFG, 43)
    meta_file = tmp_path / "checkpoints" / "17" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, params_sha256="0" * 64)))
    with pytest.raises(CheckpointError, match="do not match their SHA-256"):
        store.restore(17, template)
    with open(meta_file, "wb") as fh:  # a pickle where JSON belongs is never unpickled
        pickle.dump({"config": os.system}, fh)
    with pytest.raises(CheckpointError, match="unreadable meta"):
        store.restore(17, template)
    flat = checkpoint.flatten(template)
    flat.pop("params/logits/bias/value")
    with pytest.raises(CheckpointError, match="lacks params/logits/bias"):
        checkpoint.unflatten(template, flat)


def _cli(*args, cwd):
    # The same 8-device CPU client as this process: XLA:CPU's arithmetic can differ with it.
    return start_cli(*args, cwd=cwd, XLA_FLAGS="--xla_force_host_platform_device_count=8")


def _wait_for_step(proc, workdir: Path, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
            return
        if proc.poll() is not None:  # it died (or finished) before its first save
            raise AssertionError(f"exit {proc.returncode}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


TRAIN = ["train", "--epochs", "2", "--synthetic-per-class", "20", "--save-every", "3", "--quiet"]
TRAIN += ["--devices", "1", "--platform", "cpu"]


def _info_digest(workdir, cwd):
    out = subprocess.run(
        [sys.executable, "-m", "cnn_jax", "info", str(workdir / "checkpoints" / "34"), "--json"],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=True,
    ).stdout
    return json.loads(out)["params_sha256"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signals_then_resume_match_an_uninterrupted_run(reference, tmp_path, sig):
    digest, _, _ = reference
    workdir = tmp_path / "run"
    proc = _cli(*TRAIN, "--workdir", str(workdir), cwd=tmp_path)
    _wait_for_step(proc, workdir)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "interrupted: stopped at step" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    # a half-written save looks like this; it must never be picked up
    (workdir / "checkpoints" / "999.orbax-checkpoint-tmp-1").mkdir()
    proc = _cli(*TRAIN, "--workdir", str(workdir), cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _info_digest(workdir, tmp_path) == digest


def test_evaluate_predict_and_info_commands(reference, tmp_path, capsys):
    _, metrics, workdir = reference
    assert main(["evaluate", str(workdir), "--json", "--platform", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == metrics["test_accuracy"]  # the run's own test split
    assert result["n"] == metrics["n_test"] and len(result["per_class"]) == 43
    assert result["per_class"][14]["name"] == "Stop"

    image = tmp_path / "sign.png"
    from PIL import Image

    Image.fromarray(make_synthetic(1).images[14]).save(image)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    args = [str(image), str(tmp_path / "broken.jpg"), "--json", "--platform", "cpu"]
    code = main(["predict", str(workdir), *args])
    captured = capsys.readouterr()
    assert code == 2
    rows = json.loads(captured.out)
    assert len(rows[0]["top"]) == 3 and "error" in rows[1]
    probs = [t["probability"] for t in rows[0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert "broken.jpg" in captured.err

    assert main(["info", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "params: 319979" in out and "params_sha256: " in out


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_bad_checkpoint_paths_exit_2(tmp_path, capsys, what):
    path = tmp_path / what
    if what == "empty":
        path.mkdir()
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1


class _State(NamedTuple):
    weights: dict
    opt: dict


def _disk_full_on(store, step):
    """Makes `store`'s next save fail as orbax does on a full disk, after a partial write."""

    def save(*args, **kwargs):
        partial = store.directory / f"{step}.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
        partial.mkdir(parents=True)
        (partial / "chunk").write_bytes(b"x" * 1000)
        raise ValueError("RESOURCE_EXHAUSTED: Error writing ...: Failed to write 1955916 bytes "
                         "to file 18: No space left on device [os_error_code='28']")  # fmt: skip

    store.manager.save = save


def test_a_save_that_runs_out_of_disk_is_named_and_removes_what_it_wrote(tmp_path):
    store = Checkpoints(tmp_path)
    state = _State({"w": np.ones(3, np.float32)}, {"m": np.zeros(3, np.float32)})
    meta = RunMeta.for_run(Config(), 43, 0, 1, [])
    store.save(1, state, meta)
    _disk_full_on(store, 2)
    with pytest.raises(checkpoint.DiskFull, match="no space left on the disk of .*step 2 was"):
        store.save(2, state, meta)
    assert sorted(p.name for p in store.directory.iterdir()) == ["1"]
    assert store.steps() == [1]
    store.close()


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch):
    store = Checkpoints(tmp_path)
    state = _State({"w": np.ones(3, np.float32)}, {"m": np.zeros(3, np.float32)})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2**19))
    with pytest.raises(checkpoint.DiskFull, match=r"it needs 1\.0 MB, 0\.5 MB are free"):
        store.save(1, state, RunMeta.for_run(Config(), 43, 0, 1, []))
    assert list(store.directory.iterdir()) == []
    store.close()


def test_a_run_removes_the_unfinished_saves_of_a_killed_one(tmp_path):
    partial = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp" / "state"
    partial.mkdir(parents=True)
    Checkpoints(tmp_path, read_only=True).close()  # reading (evaluate, report) removes nothing
    assert partial.is_dir()
    Checkpoints(tmp_path).close()
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_stop_request_after_the_last_epoch_stops_before_the_final_test(
    small, reference, tmp_path
):
    from cnn_jax.callbacks import Callback

    class Epochs(Callback):
        done = 0

        def on_epoch_end(self, loop, epoch, record, state):
            self.done += 1

    epochs = Epochs()
    last = lambda: epochs.done == CFG.epochs  # noqa: E731  (a signal during the last evaluation)
    with pytest.raises(train.Interrupted, match="stopped at step 34"):
        train.fit(CFG, small, tmp_path, verbose=False, should_stop=last, callbacks=[epochs])
    assert not (tmp_path / "metrics.json").exists()
    state, metrics = train.fit(CFG, small, tmp_path, verbose=False)  # tests, trains nothing
    assert checkpoint.params_digest(state.params) == reference[0]
    assert metrics["test_accuracy"] == reference[1]["test_accuracy"]
