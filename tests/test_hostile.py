"""Hostile input: each case is one line on stderr, exit code 2, no traceback, nothing changed."""

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from cnn_jax.cli import main
from cnn_jax.config import Config

CSV_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def _fails(capsys, args, message, code=2):
    got = main(args)
    err = capsys.readouterr().err
    assert got == code, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _tree(root):
    """Every file under root with a digest of its bytes: 'nothing changed' made checkable."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _official_test(root, rows, bom=False):
    images = root / "Final_Test" / "Images"
    for i in range(4):
        write_image(images / f"{i:05d}.ppm", seed=i)
    text = "\n".join([CSV_HEADER, *rows]) + "\n"
    (images / "GT-final_test.csv").write_text(("\ufeff" if bom else "") + text)
    return root


def _train(root, *extra, workdir):
    return ["train", str(root), "--epochs", "1", "--platform", "cpu", "--workdir", str(workdir),
            "--quiet", "--no-cache", *extra]  # fmt: skip


@pytest.mark.parametrize(
    "class_id, message",
    [
        ("99999999999", "class id 99999999999 is above 9999"),
        ("2147483647", "class id 2147483647 is above 9999"),
        ("-1", "class id '-1' is not a whole number"),
        ("\u0662", "class id '\u0662' is not a whole number 0..9999 in ASCII digits"),
        ("7x", "class id '7x' is not a whole number"),
    ],
)
def test_csv_class_ids_must_be_plain_numbers(tmp_path, capsys, class_id, message):
    rows = [f"{i:05d}.ppm;36;40;5;5;30;30;{c}" for i, c in enumerate([0, 1, 1, class_id])]
    root = _official_test(tmp_path / "d", rows)
    err = _fails(capsys, _train(root, workdir=tmp_path / "w"), message)
    assert "GT-final_test.csv line 5" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "rows, message",
    [
        (["0"], "line 2 lacks a Filename or a ClassId"),
        (["00000.ppm"], "line 2 lacks a Filename or a ClassId"),
        ([], "names no images: it has a header and no rows"),
        (["../../outside.ppm;36;40;5;5;30;30;0"], "names '../../outside.ppm', outside"),
    ],
)
def test_csv_rows_that_cannot_be_used(tmp_path, capsys, rows, message):
    root = _official_test(tmp_path / "d", rows)
    write_image(tmp_path / "outside.ppm")
    _fails(capsys, _train(root, workdir=tmp_path / "w"), message)


def test_a_csv_with_a_byte_order_mark_reads(tmp_path, capsys):
    rows = [f"{i:05d}.ppm;36;40;5;5;30;30;{c}" for i, c in enumerate([0, 1, 0, 1])]
    root = _official_test(tmp_path / "d", rows, bom=True)
    assert main(["pack", str(root), str(tmp_path / "p.npz")]) == 0
    assert "packed 4 images of 2 classes" in capsys.readouterr().out


@pytest.mark.parametrize(
    "folders, message",
    [
        (["0", "1", "01"], "both name class 1: keep one"),
        (["0", "\u00b2"], "class id '\u00b2' is not a whole number"),
        (["0", "\u0662"], "class id '\u0662' is not a whole number"),
        (["0"], "the data holds images of one class only (0)"),
        (["0", "1", "2", "empty:1"], "no images of class 1: training needs images of every"),
    ],
)
def test_class_folders_that_cannot_train(tmp_path, capsys, folders, message):
    root = tmp_path / "d"
    for n, name in enumerate(folders):
        if name.startswith("empty:"):
            for f in (root / name[6:]).iterdir():
                f.unlink()
            continue
        for i in range(3):
            write_image(root / name / f"{n:05d}_{i:05d}.ppm", seed=10 * n + i)
    before = _tree(root)
    _fails(capsys, _train(root, workdir=tmp_path / "w"), message)
    assert _tree(root) == before


def test_a_batch_larger_than_the_training_split_runs_at_the_splits_size():
    from cnn_jax import train
    from cnn_jax.data.synthetic import make_synthetic

    tiny = make_synthetic(2)
    big = Config(batch_size=100_000, epochs=1, platform="cpu", devices=1, synthetic_per_class=2)
    state, metrics = train.fit(big, tiny, verbose=False)
    exact = Config(batch_size=metrics["n_train"], epochs=1, platform="cpu", devices=1,
                   synthetic_per_class=2)  # fmt: skip
    ref, ref_metrics = train.fit(exact, tiny, verbose=False)
    assert metrics["n_train"] == 51 and metrics["test_accuracy"] == ref_metrics["test_accuracy"]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(a, b)


def test_a_16_bit_grey_png_keeps_its_greys(tmp_path):
    from cnn_jax import data

    grey = np.full((20, 20), 32768, np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:  # closed here, not by a later collection
        assert im.mode.startswith("I")
    pixels = data.decode_image(tmp_path / "g.png", 10)
    assert pixels.shape == (10, 10, 3) and np.all(pixels == 128)


@pytest.fixture
def run(tmp_path, capsys):
    """A finished 2-epoch run on synthetic signs, with its checkpoint folder."""
    workdir = tmp_path / "run"
    args = ["train", "--epochs", "2", "--synthetic-per-class", "3", "--platform", "cpu"]
    assert main(args + ["--workdir", str(workdir), "--quiet"]) == 0
    capsys.readouterr()
    return workdir


def test_resuming_with_fewer_epochs_is_refused_and_changes_nothing(run, tmp_path, capsys):
    before = _tree(run)
    args = ["train", "--epochs", "1", "--synthetic-per-class", "3", "--platform", "cpu"]
    _fails(capsys, args + ["--workdir", str(run)], "has trained 2 epochs; --epochs 1 is fewer")
    assert _tree(run) == before


def _png_bomb(path: Path, side: int = 100_000) -> None:
    """A 1 KB PNG whose header declares side x side pixels (30 GB decoded at 100,000)."""
    import struct
    import zlib

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b""))


def test_predict_on_a_decompression_bomb_is_one_line(run, tmp_path, capsys):
    _png_bomb(tmp_path / "big.png")
    err = _fails(capsys, ["predict", str(run), str(tmp_path / "big.png"), "--platform", "cpu"],
                 "DecompressionBombError")  # fmt: skip
    assert "cannot read" in err


def _meta_path(run):
    steps = sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name))
    return steps[-1] / "meta" / "metadata"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(config="x"), "meta field 'config' is \"x\", expected a dict"),
        (lambda m: m.pop("num_classes"), "meta field 'num_classes' is null, expected a int"),
        (lambda m: m.pop("epoch"), "meta field 'epoch' is null"),
        (lambda m: m.update(test_accuracy="high"), "meta field 'test_accuracy' is \"high\""),
        (lambda m: m["config"].update(epochs="nonsense"), "its config: --epochs must be a whole"),
        (lambda m: m["epochs"].append("x"), "holds a record that is not numbers by name"),
    ],
)
@pytest.mark.parametrize("command", ["info", "evaluate"])
def test_checkpoint_meta_of_the_wrong_shape_is_one_line(run, capsys, change, message, command):
    path = _meta_path(run)
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    args = [command, str(run)] + (["--platform", "cpu"] if command == "evaluate" else [])
    _fails(capsys, args, message)


def test_a_checkpoint_of_another_architecture_is_named_so_and_never_set_aside(run, capsys):
    # What an old Model 3 run looks like to a newer cnn-jax: meta names a network whose arrays
    # the checkpoint does not hold (here Model 1's config on Model 2's arrays).
    for step in (run / "checkpoints").iterdir():
        path = step / "meta" / "metadata"
        meta = json.loads(path.read_text())
        meta["config"]["model"] = 1
        path.write_text(json.dumps(meta))
    message = "holds another network than its run's config builds"
    _fails(capsys, ["evaluate", str(run), "--platform", "cpu"], message)
    before = _tree(run)
    args = ["train", "--model", "1", "--epochs", "3", "--synthetic-per-class", "3"]
    _fails(
        capsys, args + ["--platform", "cpu", "--workdir", str(run), "--resume-fallback"], message
    )
    assert _tree(run) == before and not (run / "checkpoints-set-aside").exists()


@pytest.mark.parametrize("command", ["train", "pack", "info", "evaluate"])
def test_a_symlink_loop_as_the_path_is_one_line(tmp_path, capsys, command):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    extra = {"train": ["--epochs", "1"], "pack": [str(tmp_path / "x.npz")]}.get(command, [])
    err = _fails(capsys, [command, str(tmp_path / "a"), *extra], "error: ")
    assert "Symlink loop" in err or "Too many levels of symbolic links" in err, err  # 3.13+


@pytest.mark.parametrize("size", ["0", "-4", "3", "60000"])
def test_pack_refuses_an_image_size_no_model_trains_on(cs50_folder, tmp_path, capsys, size):
    out = tmp_path / "x.npz"
    _fails(capsys, ["pack", str(cs50_folder), str(out), "--image-size", size],
           f"--image-size must be 4 to 1024, not {size}")  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("inside", ["runs", "0/runs", "."])
def test_a_run_folder_inside_the_data_folder_is_refused(cs50_folder, capsys, inside):
    before = _tree(cs50_folder)
    args = _train(cs50_folder, "--batch-size", "4", "--devices", "1", workdir=cs50_folder / inside)
    _fails(capsys, args, "is inside the data folder")
    assert _tree(cs50_folder) == before  # nothing written there, not even an empty folder


def test_evaluate_refuses_a_run_whose_data_changed(tmp_path, cs50_folder, capsys):
    workdir = tmp_path / "run"
    assert (
        main(
            _train(
                cs50_folder,
                "--test-size",
                "0.5",
                "--batch-size",
                "4",
                "--devices",
                "1",
                workdir=workdir,
            )
        )
        == 0
    )
    capsys.readouterr()
    write_image(cs50_folder / "0" / "00007_00000.ppm", seed=77)
    _fails(capsys, ["evaluate", str(workdir), "--platform", "cpu"], "has changed since")


def test_resume_fallback_gets_past_a_corrupt_latest_checkpoint(run, capsys):
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir())
    latest = run / "checkpoints" / str(steps[-1]) / "state"
    biggest = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    args = ["train", "--epochs", "3", "--synthetic-per-class", "3", "--platform", "cpu"]
    args += ["--workdir", str(run), "--quiet"]
    assert main(args) == 2  # without the fallback: one line, nothing moved
    assert "--resume-fallback resumes from the newest intact one" in capsys.readouterr().err
    assert main(args + ["--resume-fallback"]) == 0
    err = capsys.readouterr().err
    aside = run / "checkpoints-set-aside" / str(steps[-1])
    assert f"moved it to {aside}" in err and aside.is_dir()
    assert json.loads((run / "metrics.json").read_text())["selected_epoch"] == 3
    assert main(args[:2] + ["4"] + args[3:]) == 0  # and on: no "already exists"


def test_a_script_without_a_main_guard_loads_a_folder(tmp_path, cs50_folder):
    import subprocess
    import sys

    from cnn_jax.data import decode

    script = tmp_path / "quick.py"
    script.write_text(
        "import sys\n"
        "from cnn_jax import data\n"
        "data.decode._THREADS_FROM = 1  # threads even for a few files\n"
        "ds = data.load_folder(sys.argv[1], use_cache=False)\n"
        "print('loaded', len(ds.labels), 'skipped', len(ds.skipped))\n"
    )
    assert decode._THREADS_FROM > 1  # the script's setting is a real change
    done = subprocess.run([sys.executable, str(script), str(cs50_folder)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["loaded 14 skipped 3"]  # the script ran once


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_while_decoding_stops_every_thread(tmp_path, signum):
    import os
    import signal
    import threading
    import time

    from cnn_jax import data, signals

    write_image(tmp_path / "a.png")
    sig = getattr(signal, signum)
    previous = signal.signal(signal.SIGTERM, signals._handle)
    # As in a terminal: a test runner started in the background inherits SIGINT ignored.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), sig))
    try:
        timer.start()
        t0 = time.perf_counter()
        # 400,000 decodes: far more work (a minute or more) than the second before the signal.
        with pytest.raises(KeyboardInterrupt):
            data.decode_files([tmp_path / "a.png"] * 400_000, 8, workers=2)
        assert time.perf_counter() - t0 < 5
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        signals.RECEIVED.clear()  # as the command's end does
    from cnn_jax.data.decode import THREAD_NAME

    time.sleep(0.1)  # each thread has stopped decoding; this lets it leave Python's list
    assert not [t for t in threading.enumerate() if t.name == THREAD_NAME]  # none left running


def test_a_bug_while_decoding_is_raised_not_skipped(tmp_path, monkeypatch):
    from cnn_jax import data
    from cnn_jax.data import decode

    write_image(tmp_path / "a.png")
    monkeypatch.setattr(decode, "_THREADS_FROM", 1)

    def broken(*args):
        raise TypeError("a bug, not a broken file")

    monkeypatch.setattr(decode, "_decode_bgr", broken)
    with pytest.raises(TypeError, match="a bug"):
        data.decode_files([tmp_path / "a.png"] * 4, 8, workers=2)


def test_a_file_name_that_is_not_utf8_trains_and_caches(tmp_path, capsys):
    import os

    root = tmp_path / "d"
    for c in range(2):
        for i in range(3):
            write_image(root / str(c) / f"{c}{i}.png", seed=3 * c + i)
    odd = os.path.join(os.fsencode(root / "1"), b"caf\xe9.png")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(odd, format="PNG")
    for n in range(2):  # the second run reads the cache the first wrote
        args = ["train", str(root), "--epochs", "1", "--batch-size", "2", "--devices", "1"]
        args += ["--platform", "cpu", "--workdir", str(tmp_path / f"w{n}"), "--quiet"]
        args += ["--cache-dir", str(tmp_path / "cache")]
        assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "w0" / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_test"] == 7


def test_json_output_is_strict():
    from cnn_jax.report import strict_json

    text = strict_json({"loss": float("nan"), "rows": [{"p": float("inf"), "q": 1.0}], "n": 3})
    parsed = json.loads(text, parse_constant=pytest.fail)
    assert parsed == {"loss": None, "rows": [{"p": None, "q": 1.0, "non_finite": True}], "n": 3,
                      "non_finite": True}  # fmt: skip


def test_the_readme_python_example_runs_as_a_plain_script(tmp_path, cs50_folder):
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"path/to/gtsrb"', f"{str(cs50_folder)!r}, cache_dir={str(tmp_path)!r}")
    code = code.replace("epochs=10", 'epochs=1, platform="cpu"')
    code = code.replace('"runs/m2-python"', repr(str(tmp_path / "run")))
    code = code.replace('split="track", val_size=0.1', "val_size=0.3")  # 14 images, few tracks
    # the example still has those parts
    assert "cache_dir" in code and "epochs=1" in code and "val_size=0.3" in code
    (tmp_path / "example.py").write_text(code)
    done = subprocess.run([sys.executable, str(tmp_path / "example.py")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
    accuracy, selected, epochs = done.stdout.splitlines()[-1].split()
    assert 0 <= float(accuracy) <= 1 and selected == epochs == "1"


# Round two: what a command writes never replaces what it reads or what is not its own.


@pytest.mark.parametrize("name", ["metrics.json", "config.json", "checkpoints/page.html"])
def test_report_never_writes_over_what_it_reads_even_with_force(run, capsys, name):
    before = _tree(run)
    _fails(capsys, ["report", str(run), "--out", str(run / name), "--force"],
           "is a file the report reads")  # fmt: skip
    assert _tree(run) == before


def test_report_replaces_a_file_not_its_own_only_with_force(run, tmp_path, capsys):
    out = tmp_path / "notes.html"
    out.write_text("my notes")
    _fails(capsys, ["report", str(run), "--out", str(out)], "is not a cnn-jax report")
    assert out.read_text() == "my notes"
    assert main(["report", str(run), "--out", str(out), "--force"]) == 0
    assert 'content="cnn-jax report"' in out.read_text()


def test_pack_writes_nothing_into_the_data_folder_and_replaces_only_with_force(
    cs50_folder, tmp_path, capsys
):
    before = _tree(cs50_folder)
    _fails(capsys, ["pack", str(cs50_folder), str(cs50_folder / "0" / "x.npz")],
           "is inside the data folder")  # fmt: skip
    assert _tree(cs50_folder) == before
    out = tmp_path / "x.npz"
    out.write_bytes(b"mine")
    _fails(capsys, ["pack", str(cs50_folder), str(out)], "exists: not overwriting it (--force")
    assert out.read_bytes() == b"mine"
    assert main(["pack", str(cs50_folder), str(out), "--force"]) == 0
    assert len(np.load(out)["labels"]) == 14


def test_a_cache_folder_inside_the_data_folder_is_refused(cs50_folder, tmp_path, capsys):
    before = _tree(cs50_folder)
    args = ["train", str(cs50_folder), "--epochs", "1", "--platform", "cpu", "--workdir",
            str(tmp_path / "run"), "--cache-dir", str(cs50_folder / "cache")]  # fmt: skip
    _fails(capsys, args, "--cache-dir")
    assert _tree(cs50_folder) == before and not (cs50_folder / "cache").exists()


@pytest.mark.parametrize(
    "files, message",
    [
        ({"thesis.tex": "mine"}, "holds files that are not a cnn-jax run's (thesis.tex)"),
        ({"config.json": '{"mine": 1}'}, "holds files that are not a cnn-jax run's (config.json)"),
    ],
)
def test_a_run_folder_holding_other_files_is_refused(tmp_path, capsys, files, message):
    workdir = tmp_path / "mine"
    workdir.mkdir()
    for name, text in files.items():
        (workdir / name).write_text(text)
    before = _tree(workdir)
    args = ["train", "--epochs", "1", "--synthetic-per-class", "3", "--platform", "cpu",
            "--workdir", str(workdir)]  # fmt: skip
    _fails(capsys, args, message)
    assert _tree(workdir) == before and sorted(p.name for p in workdir.iterdir()) == sorted(files)


def test_a_second_trainer_on_a_run_folder_in_use_is_refused(tmp_path, capsys):
    from cnn_jax import files

    workdir = tmp_path / "run"
    workdir.mkdir()
    args = ["train", "--epochs", "1", "--synthetic-per-class", "3", "--platform", "cpu",
            "--workdir", str(workdir)]  # fmt: skip
    with files.locked(workdir):  # another trainer holds it
        _fails(capsys, args, "is in use by another cnn-jax train")
    assert not (workdir / "checkpoints").exists()


def test_a_killed_trainer_leaves_its_run_folder_free(tmp_path):
    import signal
    import subprocess
    import sys

    from cnn_jax import files

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cnn_jax import files\n"
         f"with files.locked({str(workdir)!r}):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(files.UserError, match="in use"):
        with files.locked(workdir):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with files.locked(workdir):  # the system let go of the dead process's lock
        pass


def test_the_training_split_must_hold_an_image_per_class(capsys):
    args = ["train", "--epochs", "1", "--synthetic-per-class", "3", "--platform", "cpu",
            "--val-size", "0.9"]  # fmt: skip
    _fails(capsys, args, "the training split holds 7 images, fewer than the 43 classes")
    _fails(capsys, args[:-1] + ["0.99"], "77 images are too few to hold out 0.99 of them")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--aug-rotate", "45"], "--aug-rotate has no effect without --augment"),
        (["--warmup-epochs", "3"], "--warmup-epochs has no effect with --schedule constant"),
        (["--schedule", "cosine", "--warmup-epochs", "5"], "--warmup-epochs 5 is not below"),
        (["--recipe", "strong", "--model", "3", "--warmup-epochs", "30"],
         "--warmup-epochs 30 is not below --epochs 1"),
        (["gtsrb", "--synthetic-per-class", "5"], "--synthetic-per-class has no effect"),
    ],
)  # fmt: skip
def test_an_option_that_would_change_nothing_is_refused(cs50_folder, capsys, extra, message):
    extra = [str(cs50_folder) if e == "gtsrb" else e for e in extra]
    args = ["train", *extra, "--epochs", "1", "--platform", "cpu", "--workdir", "/nonexistent"]
    _fails(capsys, args, message)


@pytest.mark.parametrize("side", [0, 1, 3, 1025])
def test_a_pack_of_images_no_model_takes_is_one_line(tmp_path, capsys, side):
    path = tmp_path / "odd.npz"
    np.savez(path, images=np.zeros((4, side, side, 3), np.uint8), labels=np.array([0, 1, 0, 1]),
             paths=np.array(["a", "b", "c", "d"]), skipped_paths=np.array([], str),
             skipped_reasons=np.array([], str))  # fmt: skip
    _fails(capsys, ["train", str(path), "--platform", "cpu", "--workdir", str(tmp_path / "r")],
           f"its images are {side}x{side}, outside the 4 to 1024 pixels")  # fmt: skip


@pytest.mark.parametrize(
    "metrics, message",
    [
        ("{}", "its 'epochs' is null"),
        ("[]", "not a JSON object"),
        ('{"epochs": 5, "num_classes": 43}', "its 'epochs' is 5"),
        ('{"epochs": [{"train_loss": "low"}], "num_classes": 43}', "its 'epochs' is"),
        ('{"epochs": [], "num_classes": 43, "params": "many"}', "its 'params' is \"many\""),
        ('{"epochs": [], "num_classes": true}', "its 'num_classes' is true"),
        ('{"epochs": [1, 2', "metrics.json is not valid JSON"),
    ],
)
def test_report_on_a_metrics_file_of_the_wrong_shape_names_it(tmp_path, capsys, metrics, message):
    (tmp_path / "metrics.json").write_text(metrics)
    err = _fails(capsys, ["report", str(tmp_path)], message)
    assert str(tmp_path / "metrics.json") in err


def test_report_names_a_compared_folder_that_is_not_a_run(run, tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text('{"hello": 1}')
    _fails(capsys, ["report", str(run), "--compare", str(tmp_path / "other")],
           "other/metrics.json is not a cnn-jax run's file: its 'epochs' is null")  # fmt: skip


def _json_values():
    from hypothesis import strategies as st

    keys = st.sampled_from(["epochs", "num_classes", "params", "warnings", "platform", "x"])
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(keys, inner, max_size=4), max_leaves=10)  # fmt: skip


def test_report_on_any_metrics_file_without_a_checkpoint_is_one_line(tmp_path_factory):
    """Property: whatever JSON metrics.json holds, `report` on a folder without checkpoints
    says one line and exits 2 (the shape check first, then the missing checkpoint)."""
    import contextlib
    import io

    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_json_values())
    def check(value):
        folder = tmp_path_factory.mktemp("run")
        (folder / "metrics.json").write_text(json.dumps(value))
        (folder / "config.json").write_text('{"model": 2}')
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["report", str(folder)])
        assert code == 2 and err.getvalue().count("\n") == 1, err.getvalue()
        assert "Traceback" not in err.getvalue()

    check()


def test_a_full_disk_is_one_line_and_leaves_no_half_checkpoint(tmp_path):
    """A 400 KB disk (a tmpfs in a mount namespace of the test's own) holds the run's JSON but
    not its first 1.3 MB checkpoint."""
    import shutil
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=400k tmpfs {disk}"]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("no mount namespace here (unshare -rm) to make a small disk in")
    train = [sys.executable, "-m", "cnn_jax", "train", "--epochs", "1", "--platform", "cpu",
             "--synthetic-per-class", "3", "--quiet", "--workdir", str(disk / "run")]  # fmt: skip
    script = (f"mount -t tmpfs -o size=400k tmpfs {disk} && {' '.join(train)} 2>{tmp_path}/err;"
              f" echo exit=$?; cd {disk} && find . | sort")  # fmt: skip
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    err = (tmp_path / "err").read_text()
    lines = done.stdout.split()
    assert lines[0] == "exit=2", err
    assert err.count("\n") == 1 and "no space left on the disk of" in err, err
    assert f"{disk}/run/checkpoints" in err and "Traceback" not in err
    assert len(err) - len(str(disk)) < 220  # short, whatever the folder's name
    assert not [p for p in lines if "tmp" in p], lines  # orbax's unfinished folders are gone
    assert "./run/checkpoints" in lines and not [p for p in lines if "checkpoints/" in p]
