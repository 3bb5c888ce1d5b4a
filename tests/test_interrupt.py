"""Signals while a command loads its data: it ends within 2 s, with one line and exit code
128 + the signal, and leaves no process behind; and at any moment of a run: it ends resumably."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image

pytestmark = pytest.mark.xdist_group("interrupt")  # module fixtures set up once (pyproject.toml)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """3 classes of 1,200 copies of a 400x400 PNG each: 3,600 decodes, 4-15 s on 2 cores (the
    more, the busier they are), so most moments below land in them."""
    root = tmp_path_factory.mktemp("many")
    write_image(root / "one.png", size=(400, 400))
    for c in range(3):
        (root / "data" / str(c)).mkdir(parents=True)
        for i in range(1200):  # hard links: copies would take 1.7 GB of disk
            os.link(root / "one.png", root / "data" / str(c) / f"{i:05d}_00000.png")
    return root / "data"


def _signal_at(folder, workdir, delay: float, sig) -> tuple[int, float, str, str]:
    """Starts `cnn-jax train FOLDER` in a session of its own, signals it after `delay` s;
    returns (exit code, seconds from the signal to the exit, stdout, stderr)."""
    # Ctrl-C as a terminal delivers it: a suite started as a background job has SIGINT ignored
    # and would pass that on (cnn-jax leaves an ignored SIGINT ignored); a handled signal is
    # reset to its default in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnn_jax", "train", str(folder), "--no-cache", "--platform",
         "cpu", "--epochs", "1", "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    signal.signal(signal.SIGINT, previous)
    time.sleep(delay)
    sent = time.perf_counter()
    os.kill(proc.pid, sig)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    took = time.perf_counter() - sent
    try:
        os.killpg(proc.pid, 0)
        left = True
    except ProcessLookupError:
        left = False
    assert not left, "a process of the command's group outlived it"
    return proc.returncode, took, out, err


# A seeded spread of moments from start-up to the middle of decoding (loading starts about
# 2-3 s in, after JAX is imported).
MOMENTS = sorted(np.random.default_rng(19).uniform(0.3, 5.0, 6).round(2).tolist())


@pytest.mark.slow
@pytest.mark.parametrize("delay", MOMENTS)
def test_a_signal_while_starting_or_loading_ends_it_at_once(big_folder, tmp_path, delay):
    sig = signal.SIGTERM if int(delay * 100) % 2 else signal.SIGINT
    code, took, out, err = _signal_at(big_folder, tmp_path / "run", delay, sig)
    assert code == 128 + sig, err
    assert took < 2.0, f"ended {took:.1f} s after the signal"
    assert "Traceback" not in err, err
    if "loaded" not in out:  # still starting or loading: one line, nothing was written
        # "cnn-jax: ..." while its arguments are not yet parsed (the imports come first)
        line = f"interrupted ({signal.Signals(sig).name})"
        assert err.strip().splitlines() in ([f"cnn-jax train: {line}"], [f"cnn-jax: {line}"]), err
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_signal_at_any_moment_of_a_run_ends_it_resumably(tmp_path):
    """scripts/signal_sweep.py, three seeded moments: each run ends with 128 + the signal and
    its line, and the same command then finishes with the uninterrupted run's exact results."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "signal_sweep.py"
    done = subprocess.run(
        [sys.executable, str(script), "--moments", "3", "--seed", "7", "--folder", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("3 of 3 moments clean"), done.stdout
