"""Several processes (hosts) as one run, joined by JAX's distributed runtime.

Every process runs the same program on the same data: the batch order and the random streams
come from the seed, so they agree by construction. What they must agree on at run time (a stop
request, the step to resume from, that they see the same run folder and the same data) goes
through the functions here; only process 0 writes files and prints. With one process each of
them is a no-op.
"""

import os
import secrets
from pathlib import Path

import numpy as np

from cnn_jax.errors import UserError
from cnn_jax.files import SHARED

# For launchers that set the environment rather than the command line (a Kubernetes Indexed
# Job's JOB_COMPLETION_INDEX, say); the options win.
ENVIRONMENT = {
    "coordinator": "CNN_JAX_COORDINATOR",
    "num_processes": "CNN_JAX_NUM_PROCESSES",
    "process_id": "CNN_JAX_PROCESS_ID",
}


# The exit code of a process whose partner died: neither bad input (2) nor a bug (1).
PEER_LOST_EXIT = 4
# How the collectives fail when a partner is gone (gloo on CPU; the coordination service).
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Gloo", "UNAVAILABLE",
              "DEADLINE_EXCEEDED", "heartbeat")  # fmt: skip


def lost_peer(e: BaseException) -> bool:
    """Whether `e`, raised by JAX in a run of several processes, says a partner is gone."""
    return count() > 1 and any(text in str(e) for text in _PEER_LOST)


def peer_lost_message(e: BaseException, workdir) -> str:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return (
        f"another process of the run is gone ({why}); this one stops too: start them all "
        f"again to resume from {workdir}"
    )


def settings(coordinator=None, num_processes=None, process_id=None) -> dict:
    """The joining settings from the options, else the environment; {} for one process."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, name in ENVIRONMENT.items():
        if given[key] is None and os.environ.get(name):
            given[key] = (
                os.environ[name] if key == "coordinator" else _whole(name, os.environ[name])
            )
    if all(v is None for v in given.values()):
        return {}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise UserError(
            f"joining several processes needs {flags} too (or {ENVIRONMENT[missing[0]]})"
        )
    if not 1 <= given["num_processes"] or not 0 <= given["process_id"] < given["num_processes"]:
        raise UserError(
            f"--process-id {given['process_id']} is not one of the {given['num_processes']} "
            "processes (0 to --num-processes - 1)"
        )
    return given


def _whole(name: str, text: str) -> int:
    if not text.strip().isdigit():
        raise UserError(f"${name} is {text!r}, not a whole number")
    return int(text)


def join(given: dict, auto: bool, timeout: int, heartbeat: int) -> None:
    """Joins the other processes before anything touches the backend. `auto`: what
    jax.distributed detects by itself (SLURM, Open MPI, TPU pods, ...)."""
    if not given and not auto:
        return
    import jax

    try:
        jax.distributed.initialize(
            given.get("coordinator"),
            given.get("num_processes"),
            given.get("process_id"),
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=heartbeat,
        )
    except (RuntimeError, ValueError) as e:  # jaxlib's errors for an unreachable peer or none
        where = given.get("coordinator") or "the detected cluster"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not join the run's processes at {where}: {first[:200]}") from None


def count() -> int:
    import jax

    return jax.process_count()


def is_main() -> bool:
    """Whether this process writes the run's files and prints (process 0)."""
    import jax

    return jax.process_index() == 0


def _gather(value: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value))


def barrier(name: str) -> None:
    if count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def from_main(value: int) -> int:
    """Process 0's `value` (below 2**31: JAX's integers are 32-bit), in every process."""
    if count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def first_signal(local: int | None) -> int | None:
    """The signal any process has received (the lowest number), in every process: a stop
    request is decided by all of them at the same step."""
    if count() == 1:
        return local
    got = _gather(np.int32(local or 0))
    got = got[got > 0]
    return int(got.min()) if len(got) else None


def _first_differing(data: bytes) -> int | None:
    """The first process whose `data` (its first 16 bytes, zero-padded) is not process 0's;
    None when every process holds the same. (Process 0's token is never empty: it has just
    written it.)"""
    every = _gather(np.frombuffer(data.ljust(16, b"\0")[:16], np.uint8))
    return next((i for i, d in enumerate(every) if not np.array_equal(d, every[0])), None)


def check_same(what: str, digest: str) -> None:
    """Refuses to go on when the processes hold different `what` (their data, say)."""
    if count() == 1:
        return
    differ = _first_differing(bytes.fromhex(digest))
    if differ is not None:
        raise UserError(
            f"process {differ} holds other {what} than process 0: every process must load "
            "the same data folder, with the same options"
        )


def check_shared(folder: Path) -> None:
    """Refuses a run folder that the processes do not all see: checkpoints are saved by all
    of them together, into one folder on storage every process reaches."""
    if count() == 1:
        return
    token = Path(folder) / SHARED
    if is_main():
        token.write_text(secrets.token_hex(8))
    barrier("cnn-jax: run folder written")
    differ = _first_differing(token.read_text().encode() if token.is_file() else b"")
    if differ is not None:
        raise UserError(
            f"process {differ} does not see the run folder {folder} as process 0 wrote it: "
            "give a --workdir on storage every process reaches (a shared file system)"
        )
