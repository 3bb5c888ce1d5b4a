"""What several processes cost on one machine (`python scripts/bench.py --processes [DATA]`).

Training: the same `cnn-jax train` run as 1 process over 2 CPU devices and as 2 processes of 1
device (`cnn-jax launch -n 2`), images/s from each run's median step time (metrics.json) and
the whole command's wall time. Joining: seconds from starting the processes to the end of their
first collective (import JAX, jax.distributed.initialize, a barrier), against one process that
imports JAX and lists its devices.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnn_jax.cli.launch import free_port

JOIN = """
import os, sys, time
import jax
if len(sys.argv) > 1:
    jax.distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("bench")
jax.devices()
print(time.time() - float(os.environ["T0"]))
"""


def join_seconds(processes: int) -> float:
    """From starting `processes` Python processes to the end of their first barrier (the
    slowest one's), or to JAX's device list for one process."""
    env = dict(os.environ, T0=str(time.time()), JAX_PLATFORMS="cpu")
    port = free_port()
    args = [[] if processes == 1 else [f"127.0.0.1:{port}", str(processes), str(i)]
            for i in range(processes)]  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", JOIN, *a], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for a in args]  # fmt: skip
    return max(float(p.communicate(timeout=300)[0].split()[-1]) for p in procs)


def training(data: str | None, epochs: int) -> list[dict]:
    run = ["train", *([data] if data else ["--synthetic-per-class", "100"]), "--epochs",
           str(epochs), "--platform", "cpu", "--quiet"]  # fmt: skip
    shapes = [("1 process x 2 devices", run, "2"),
              ("2 processes x 1 device", ["launch", "-n", "2", "--", *run], "1")]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, command, devices in shapes:
            workdir = Path(tmp) / name.replace(" ", "-")
            env = dict(os.environ, JAX_NUM_CPU_DEVICES=devices, PYTHONWARNINGS="ignore")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cnn_jax", *command, "--workdir", str(workdir)],
                           env=env, check=True, capture_output=True)  # fmt: skip
            wall = time.perf_counter() - t0
            m = json.loads((workdir / "metrics.json").read_text())
            ms = m["median_step_ms"]
            rows.append({"run": name, "median_step_ms": ms, "images_per_s": 32e3 / ms,
                         "wall_s": wall, "test_accuracy": m["test_accuracy"]})  # fmt: skip
    return rows


def main(data: str | None, epochs: int = 2) -> None:
    for row in training(data, epochs):
        print(f"processes  {row['run']:<24} {row['median_step_ms']:6.2f} ms/step "
              f"({row['images_per_s']:6,.0f} img/s)  whole run {row['wall_s']:5.1f} s  "
              f"test accuracy {row['test_accuracy']:.4f}", flush=True)  # fmt: skip
    one, two = join_seconds(1), join_seconds(2)
    print(f"processes  start: 1 process {one:.2f} s to its devices; 2 processes {two:.2f} s to "
          f"their first barrier (joined over 127.0.0.1)")  # fmt: skip
