"""The `cnn-jax` command: a whole run on synthetic data, and one-line errors with exit code 2."""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cnn_jax.cli import main
from cnn_jax.cli.options import parser as cli_parser


def test_train_on_synthetic_data(tmp_path, capsys):
    code = main(
        ["train", "--epochs", "1", "--synthetic-per-class", "8", "--workdir", str(tmp_path / "r")]
        + ["--platform", "cpu"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Epoch 1/1" in out and "loaded 344 images of 43 classes" in out
    assert out.strip().splitlines()[-1].startswith("test: loss ")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert out.strip().endswith(f"accuracy {metrics['test_accuracy']:.4f}")
    # The synthetic signs come in tracks too, and a random split mixes each one's photos.
    assert "note: the random split put photos of the same physical signs" in out
    assert "chosen by validation" not in out


def test_the_epoch_chosen_by_validation_is_named_above_the_test_line(tmp_path, capsys):
    args = ["train", "--epochs", "2", "--synthetic-per-class", "20", "--val-size", "0.25"]
    args += ["--split", "track", "--workdir", str(tmp_path / "r"), "--platform", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    chosen = f"epoch {metrics['selected_epoch']}, chosen by validation accuracy"
    assert out.strip().splitlines()[-2] == (
        f"model: {chosen} {metrics['val_accuracy']:.4f} (0.25 of the training side)"
    )
    assert "note: the random split" not in out


def test_train_on_a_folder_reports_skipped_files(cs50_folder, tmp_path, capsys):
    args = ["train", str(cs50_folder), "--model", "1", "--epochs", "1", "--test-size", "0.3"]
    args += [
        "--workdir",
        str(tmp_path / "r"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--platform",
        "cpu",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped 3 unreadable files" in out and "skipped 1/notes.txt" in out
    # GTSRB file names: a random split mixes each track's photos, and the output says so.
    assert "note: the random split put photos of the same physical signs" in out
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
        (
            lambda d: (d / "data" / "signs").mkdir(parents=True),
            ["train", "data"],
            "not a whole number",
        ),
        (None, ["train", "--test-size", "1.5", "--synthetic-per-class", "2"], "--test-size"),
        (None, ["train", "--lr", "-1"], "--lr must be above 0"),
        (None, ["train", ""], "the data argument must be a non-empty text"),
        (None, ["train", "--steps-per-call", "0"], "'auto' or a whole number >= 1"),
        (None, ["train", "--seed", "1180591620717411303424"], "--seed must be at most"),
        (None, ["train", "--platform", "tpu"], "JAX finds no TPU here"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, make, args, message):
    if make:
        make(tmp_path)
    r = _run(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


def test_pack_then_train_and_evaluate_from_the_file(cs50_folder, tmp_path, capsys):
    packed = tmp_path / "signs.npz"
    assert main(["pack", str(cs50_folder), str(packed)]) == 0
    assert "packed 14 images of 3 classes" in capsys.readouterr().out
    assert main(["pack", str(cs50_folder), str(packed)]) == 2  # never overwrites
    args = ["train", str(packed), "--epochs", "1", "--test-size", "0.3", "--platform", "cpu"]
    assert main([*args, "--workdir", str(tmp_path / "r"), "--precision", "highest"]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert len(metrics["skipped_files"]) == 3 and metrics["n_train"] + metrics["n_test"] == 14
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["precision"] == "highest" and config["data"] == str(packed)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r"), str(packed), "--json", "--platform", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 14
    # a resume must keep the precision, as any setting that changes the result
    code = main([*args, "--workdir", str(tmp_path / "r"), "--epochs", "2"])
    assert code == 2 and "--precision is 'default' but the run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(labels=np.zeros(3, np.int32)), "labels are not one integer per image"),
        (dict(labels=np.array([0, 1, 2, 2**31 - 1])), "labels go up to 2147483647, above 9999"),
        (dict(labels=np.array([0, 1, 2, 2**32 + 2])), "labels go up to 4294967298, above 9999"),
        (dict(images=np.zeros((4, 30, 30, 3), np.float32)), "images are not"),
        (dict(paths=np.arange(4)), "paths are not"),
    ],
)
def test_a_broken_pack_is_one_line_and_exit_2(tmp_path, arrays, message):
    good = dict(
        images=np.zeros((4, 30, 30, 3), np.uint8),
        labels=np.arange(4, dtype=np.int32),
        paths=np.array([f"{i}/a.ppm" for i in range(4)]),
        skipped_paths=np.array([], str),
        skipped_reasons=np.array([], str),
    )
    np.savez(tmp_path / "bad.npz", **{**good, **arrays})
    r = _run("train", "bad.npz", "--platform", "cpu", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


def test_a_pack_whose_header_claims_a_billion_images_is_one_line(tmp_path, capsys):
    """1 KB of pixels under a header of 10^9 images: NumPy asks for 2.5 TB before reading."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 30, 30, 3)}
    )
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as z:
        z.writestr("images.npy", header.getvalue() + bytes(1024))
        for name, array in dict(labels=np.arange(4), paths=np.array(["0/a.ppm"] * 4),
                                skipped_paths=np.array([], str),
                                skipped_reasons=np.array([], str)).items():  # fmt: skip
            buffer = io.BytesIO()
            np.save(buffer, array)
            z.writestr(f"{name}.npy", buffer.getvalue())
    assert main(["train", str(tmp_path / "big.npz"), "--platform", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "need more memory than this machine has" in err, err


def test_a_pack_of_another_image_size_is_refused(cs50_folder, tmp_path, capsys):
    assert main(["pack", str(cs50_folder), str(tmp_path / "s.npz"), "--image-size", "32"]) == 0
    assert main(["train", str(tmp_path / "s.npz"), "--platform", "cpu"]) == 2
    assert "holds 32x32 images: use --image-size 32" in capsys.readouterr().err


def test_every_option_of_every_command_says_what_it_does():
    parser = cli_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "evaluate", "predict", "info", "pack"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"cnn-jax {name} {action.option_strings or action.dest}"
    text = commands["train"].format_help()
    assert "(default: auto)" in text and "(default: keras-adam)" in text


def test_config_choices_are_the_implementations():
    """Config names the choices once; the tables that implement them must match it."""
    from cnn_jax import config, models, optim

    assert set(config.DTYPES) == set(models.DTYPES)
    assert set(config.OPTIMIZERS) == set(optim.DIRECTIONS)


@pytest.mark.parametrize("error", [RuntimeError, ValueError, KeyError, OSError])
def test_a_bug_is_exit_1_with_its_traceback_not_bad_input(tmp_path, capsys, monkeypatch, error):
    from cnn_jax import train

    def broken(*args, **kwargs):
        raise error("an internal inconsistency")  # a ValueError or an OSError of ours too

    monkeypatch.setattr(train, "fit", broken)
    args = ["train", "--epochs", "1", "--synthetic-per-class", "2", "--platform", "cpu"]
    assert main([*args, "--workdir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "an internal inconsistency" in err
    assert err.strip().splitlines()[-1].startswith("cnn-jax train: internal error:")


def test_building_the_options_imports_no_jax():
    """`cnn-jax --help` stays fast, and a signal while options are parsed never lands inside
    JAX's import (it once aborted the process: an export module imported JAX at the top)."""
    code = (
        "import sys; from cnn_jax.cli import options; options.parser()\n"
        "assert not {'jax', 'tensorflow'} & set(sys.modules), 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_signal_while_the_processes_agree_is_kept_for_the_next_step(monkeypatch):
    """The processes' agreement on a stop blocks until all have asked: a signal handled then
    was erased by the answer (no process had one when asked), and the run trained on."""
    import signal

    from cnn_jax import distributed, signals
    from cnn_jax.cli.train import _StopOnSignal

    monkeypatch.setattr(signals, "RECEIVED", [])  # none from other tests in this process
    stop = _StopOnSignal()

    def agree_while_a_signal_comes(local):
        stop._handle(signal.SIGTERM, None)  # handled while waiting for the others
        return local  # what every process had when asked: nothing

    monkeypatch.setattr(distributed, "first_signal", agree_while_a_signal_comes)
    assert stop() is False  # this step's answer
    monkeypatch.setattr(distributed, "first_signal", lambda local: local)
    assert stop() is True and stop.signum == signal.SIGTERM  # the next step stops
