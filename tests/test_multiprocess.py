"""Several processes as one run, with real local processes joined over 127.0.0.1 (gloo on CPU):
the same parameters as one process over as many devices, one writer, one stop, no hang."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnn_jax.cli.launch import free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]  # see pyproject.toml

RUN = ["train", "--epochs", "2", "--synthetic-per-class", "10", "--platform", "cpu",
       "--save-every", "4", "--quiet"]  # fmt: skip


def _start(workdir, index, count, port, *extra, devices=1):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), PYTHONWARNINGS="ignore")
    join = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count),
            "--process-id", str(index), "--heartbeat-timeout", "10"]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "cnn_jax", *RUN, "--workdir", str(workdir), *join, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _processes(workdir, count=2, *extra, devices=1):
    port = free_port()
    return [_start(workdir, i, count, port, *extra, devices=devices) for i in range(count)]


def _finish(procs, timeout=300):
    """(exit code, stdout, stderr) of each process."""
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        finally:
            p.kill()
        out.append((p.returncode, o, e))
    return out


def _wait_for_training(workdir, timeout=120) -> None:
    """Until process 0 writes config.json: after the barrier that every process passes with
    its stop handler set, before the first step compiles. A signal sent then always lands
    while the run trains (the first checkpoint came too close to the end on a busy machine)."""
    deadline = time.monotonic() + timeout
    config = Path(workdir) / "config.json"
    while time.monotonic() < deadline:
        if config.is_file():
            return
        time.sleep(0.01)
    raise AssertionError(f"no {config} after {timeout} s")


def _digest(workdir) -> str:
    info = subprocess.run([sys.executable, "-m", "cnn_jax", "info", str(workdir), "--json"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(info.stdout)["params_sha256"]


def _metrics(workdir) -> dict:
    return json.loads((Path(workdir) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process over two CPU devices."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, "-m", "cnn_jax", *RUN, "--workdir", str(workdir)], env=env,
                   check=True, capture_output=True)  # fmt: skip
    return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two") / "run"
    results = _finish(_processes(workdir))
    return workdir, results


def test_two_processes_of_one_device_train_as_one_process_of_two(one_process, two_processes):
    workdir, results = two_processes
    assert [code for code, _, _ in results] == [0, 0], results
    assert _digest(workdir) == _digest(one_process)
    mine, ref = _metrics(workdir), _metrics(one_process)
    for key in ("test_loss", "test_accuracy", "n_train", "n_test"):
        assert mine[key] == ref[key], key
    assert [e["train_loss"] for e in mine["epochs"]] == [e["train_loss"] for e in ref["epochs"]]
    assert (mine["processes"], mine["devices_per_process"]) == (2, 1)
    assert (ref["processes"], ref["devices_per_process"]) == (1, 2)


def test_only_process_0_writes_and_prints(two_processes):
    workdir, results = two_processes
    names = sorted(p.name for p in workdir.iterdir())
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == 1, names
    assert set(names) - set(events) == {".lock", ".processes", "checkpoints", "config.json",
                                        "metrics.json"}  # fmt: skip
    (_, out0, _), (_, out1, err1) = results
    ours = lambda text: [x for x in text.splitlines() if not x.startswith("[Gloo]")]  # noqa: E731
    from cnn_jax.report import test_line

    metrics = _metrics(workdir)  # one line: the run's test line
    assert ours(out0) == [test_line(metrics["test_loss"], metrics["test_accuracy"])], out0
    assert ours(out1) == [] and ours(err1) == []  # gloo's own line when it connects aside


def test_a_signal_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path, one_process):
    """...resumed by one process of two devices: checkpoints hold host arrays, which any number
    of processes restores (the launcher's test goes the other way, from one to two)."""
    workdir = tmp_path / "run"
    procs = _processes(workdir)
    _wait_for_training(workdir)
    procs[1].send_signal(signal.SIGTERM)
    results = _finish(procs)
    assert [code for code, _, _ in results] == [143, 143], results
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 18, steps  # stopped before the end, at one step for both
    assert "stopped at step" in results[0][2]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "cnn_jax", *RUN, "--workdir", str(workdir)]
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _digest(workdir) == _digest(one_process)


def test_a_process_that_dies_ends_the_others_with_one_line(tmp_path):
    workdir = tmp_path / "run"
    procs = _processes(workdir)
    _wait_for_training(workdir)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    (code, _, err), _ = _finish(procs, timeout=120)
    took = time.monotonic() - t0
    assert code not in (0, None), err
    lines = [x for x in err.strip().splitlines() if x]
    assert lines and "Traceback" not in err, err
    assert "process" in lines[-1], err
    print(f"process 0 ended {took:.1f} s after process 1 was killed: {lines[-1]}")


def test_a_run_folder_the_processes_do_not_share_is_refused(tmp_path):
    port = free_port()
    procs = [_start(tmp_path / f"local{i}" / "run", i, 2, port) for i in range(2)]
    results = _finish(procs)
    for code, _, err in results:
        assert code == 2, err
        assert "does not see the run folder" in err and err.count("\n") == 1, err


def test_the_launcher_goes_on_with_a_run_of_one_process_as_two(tmp_path, one_process):
    workdir = tmp_path / "run"
    first = [*RUN]
    first[first.index("--epochs") + 1] = "1"  # one epoch first (a constant rate: epochs may grow)
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, "-m", "cnn_jax", *first, "--workdir", str(workdir)], env=env,
                   check=True, capture_output=True)  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "cnn_jax", "launch", "-n", "2", "--", *RUN, "--workdir",
         str(workdir)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("test: loss") == 1  # process 0 alone speaks
    assert _digest(workdir) == _digest(one_process)


def _params(workdir) -> dict:
    from cnn_jax.checkpoint import flatten
    from cnn_jax.inference import load_checkpoint

    return flatten(load_checkpoint(workdir, "cpu").params)


def test_two_processes_of_two_devices_train_close_to_one_process_of_four(tmp_path):
    """Not bit for bit: gloo sums the four devices' gradients across the processes in another
    order than XLA does within one. As between 1 and 8 devices in one process
    (test_parallel.py), the weights stay close relative to how far they moved (Adam moves an
    entry whose gradient is rounding noise a whole learning rate either way; such entries are
    few, so the norm of the difference stays a small share of the norm of the update)."""
    from numerics import relative

    from cnn_jax import steps
    from cnn_jax.checkpoint import flatten
    from cnn_jax.config import Config

    procs = _processes(tmp_path / "two", 2, devices=2)
    assert [code for code, _, _ in _finish(procs)] == [0, 0]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, "-m", "cnn_jax", *RUN, "--workdir", str(tmp_path / "one")],
                   env=env, check=True, capture_output=True)  # fmt: skip
    _, state = steps.create_trainer(Config(platform="cpu", synthetic_per_class=10, devices=1),
                                    43, 9)  # fmt: skip
    start, two, one = flatten(state.params), _params(tmp_path / "two"), _params(tmp_path / "one")
    for key in start:
        assert relative(one[key], two[key], one[key] - start[key]) < 1e-2, key
    m2, m1 = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert abs(m2["test_accuracy"] - m1["test_accuracy"]) <= 1 / m1["n_test"]
