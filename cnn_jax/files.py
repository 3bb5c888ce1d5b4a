"""What cnn-jax writes, and where: a file whole or not at all, nothing inside a folder it reads
or over a file of someone else's, and one trainer per run folder."""

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path

from cnn_jax.errors import UserError

LOCK = ".lock"
SHARED = ".processes"  # distributed.check_shared's token: every process of a run must read it


def write_whole(path: Path, content: str | bytes) -> None:
    """`content` into `path` through a temporary file beside it: a signal, a kill or a full
    disk leaves the earlier file (or none), never half of one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        if isinstance(content, bytes):
            partial.write_bytes(content)
        else:
            partial.write_text(content)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def is_inside(path, folder) -> bool:
    """Whether `path` is `folder` or lies below it, links resolved."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def refuse_inside(out, folder, what: str, option: str = "") -> None:
    """An output inside a folder the command reads is refused: the next read would see it.
    `option` names the output as the user gave it (--workdir, say)."""
    if folder and Path(folder).is_dir() and is_inside(out, folder):
        raise UserError(
            f"{option + ' ' if option else ''}{out} is inside {what} {folder}, which cnn-jax only "
            "reads (what is written there would be read as data next time): choose a place "
            "outside it"
        )


def refuse_existing(out: Path, force: bool) -> None:
    if Path(out).exists() and not force:
        raise UserError(f"{out} exists: not overwriting it (--force replaces it)")


def check_run_folder(workdir: Path) -> None:
    """A run folder is new, empty or a cnn-jax run's: `fit` writes config.json, metrics.json
    and TensorBoard files there, which must not replace or join a user's own files."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a folder: give a folder for the run")
    if not workdir.is_dir():
        return
    config = workdir / "config.json"
    if config.exists() and run_config(workdir) is None:
        foreign = ["config.json"]
    elif (workdir / "checkpoints").is_dir() or config.exists():
        return
    else:
        foreign = sorted(p.name for p in workdir.iterdir() if p.name not in (LOCK, SHARED))
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise UserError(
            f"--workdir {workdir} holds files that are not a cnn-jax run's ({shown}): give a new "
            "or empty folder, or a run's folder"
        )


def run_config(workdir: Path) -> dict | None:
    """The settings in a run folder's config.json, or None when it has none a cnn-jax run
    wrote (missing, unreadable, or someone else's file)."""
    try:
        value = json.loads((Path(workdir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    is_run = isinstance(value, dict) and {"model", "epochs", "seed"} <= value.keys()
    return value if is_run else None


@contextlib.contextmanager
def locked(workdir: Path):
    """Holds the run folder for one trainer. The system drops the lock with its holder's last
    file descriptor, so a killed trainer leaves nothing stuck."""
    fd = os.open(Path(workdir) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(
                f"--workdir {workdir} is in use by another cnn-jax train: wait for it to end, or "
                "give another --workdir"
            ) from None
        yield
    finally:
        os.close(fd)
