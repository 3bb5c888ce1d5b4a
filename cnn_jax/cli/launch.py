"""`cnn-jax launch -n N -- train ...`: N local processes joined as one run, for trying a
multi-process run on one machine (torchrun's standalone mode, for cnn-jax).

Each child gets CNN_JAX_COORDINATOR (a free port on 127.0.0.1), CNN_JAX_NUM_PROCESSES and
CNN_JAX_PROCESS_ID, and on CPU JAX_NUM_CPU_DEVICES; Ctrl-C and SIGTERM are passed to all of
them. The exit code is the first failing child's, else 0.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from cnn_jax.errors import UserError

# After one child failed, how long the others may take to notice and end by themselves (they
# stop at their next collective, or at JAX's heartbeat timeout) before they are killed.
GRACE_S = 120


def add_options(p) -> None:
    p.add_argument("-n", "--num-processes", type=int, required=True, metavar="N",
                   help="how many processes to start")  # fmt: skip
    p.add_argument(
        "--devices-per-process",
        type=int,
        default=1,
        metavar="K",
        help="CPU devices of each process (JAX_NUM_CPU_DEVICES)",
    )
    p.add_argument(
        "cnn_jax_args",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="the cnn-jax command each process runs, e.g. -- train DATA --workdir R",
    )


def command(args) -> int:
    if not 1 <= args.num_processes <= 64:
        raise UserError(f"-n must be 1 to 64 processes, not {args.num_processes}")
    if args.devices_per_process < 1:
        raise UserError(f"--devices-per-process must be at least 1, not {args.devices_per_process}")
    command = [a for a in args.cnn_jax_args if a != "--"]
    if not command:
        raise UserError("give the command to run after --, e.g. -- train DATA --workdir runs/x")
    port = free_port()  # the coordinator's, process 0's
    children = [_start(args, command, i, port) for i in range(args.num_processes)]
    forward = lambda signum, frame: [c.send_signal(signum) for c in children if c.poll() is None]  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(children)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for c in children:
            if c.poll() is None:
                c.kill()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 when asked."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, command: list[str], index: int, port: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        CNN_JAX_COORDINATOR=f"127.0.0.1:{port}",
        CNN_JAX_NUM_PROCESSES=str(args.num_processes),
        CNN_JAX_PROCESS_ID=str(index),
        JAX_NUM_CPU_DEVICES=str(args.devices_per_process),
    )
    return subprocess.Popen([sys.executable, "-m", "cnn_jax", *command], env=env)


def _wait(children) -> int:
    failed_at, code = None, 0
    while any(c.poll() is None for c in children):
        bad = [c.returncode for c in children if c.returncode not in (None, 0)]
        if bad and failed_at is None:
            failed_at, code = time.monotonic(), bad[0]
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            print(f"cnn-jax launch: the other processes did not end {GRACE_S} s after process "
                  f"{_index_of(children, code)} failed: killing them", file=sys.stderr)  # fmt: skip
            break
        time.sleep(0.1)
    codes = [c.returncode for c in children]
    code = code or next((c for c in codes if c not in (None, 0)), 0)
    return code if code >= 0 else 128 - code  # killed by a signal: as a shell reports it


def _index_of(children, code: int) -> int:
    return next(i for i, c in enumerate(children) if c.returncode == code)
