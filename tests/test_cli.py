"""The `cnn-jax` command: a whole run on synthetic data, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest

from cnn_jax.cli import main


def test_train_on_synthetic_data(tmp_path, capsys):
    code = main(
        ["train", "--epochs", "1", "--synthetic-per-class", "8", "--workdir", str(tmp_path / "r")]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Epoch 1/1" in out and "loaded 344 images of 43 classes" in out
    assert out.strip().splitlines()[-1].startswith("test: loss ")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert out.strip().endswith(f"accuracy {metrics['test_accuracy']:.4f}")


def test_train_on_a_folder_reports_skipped_files(cs50_folder, tmp_path, capsys):
    args = ["train", str(cs50_folder), "--model", "1", "--epochs", "1", "--test-size", "0.3"]
    args += ["--workdir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped 3 unreadable files" in out and "skipped 1/notes.txt" in out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert len(metrics["skipped_files"]) == 3 and metrics["num_classes"] == 3


def _run(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "cnn_jax", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


@pytest.mark.parametrize(
    "make, args, message",
    [
        (None, ["train", "missing-folder"], "does not exist"),
        (lambda d: (d / "data" / "signs").mkdir(parents=True), ["train", "data"], "not a number"),
        (None, ["train", "--test-size", "1.5", "--synthetic-per-class", "2"], "test size"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, make, args, message):
    if make:
        make(tmp_path)
    r = _run(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr
