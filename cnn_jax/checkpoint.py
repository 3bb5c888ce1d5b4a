"""Orbax checkpoints of a run: save, find, verify and restore. The only module that imports orbax.

A checkpoint is WORKDIR/checkpoints/<step>/ with two items:
  state: the whole training state (params, optimizer state, step, running epoch metrics) as a
         flat {path: array} dict, so it restores into any structure and onto any device count;
  meta:  JSON with the config, epoch and position in it, the metrics so far and a SHA-256 of the
         weights (parameters and batch statistics), which every restore checks.
Orbax writes each step into a temporary folder and renames it when complete, so a process killed
mid-save leaves nothing that is picked up later; the next run removes it.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cnn_jax import distributed
from cnn_jax.errors import UserError
from cnn_jax.run_meta import RunMeta


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not fit the run."""


class OtherNetwork(CheckpointError):
    """An intact checkpoint of another architecture than the run's config builds."""


class DiskFull(CheckpointError):
    """A save that ran out of disk space; what it had written is removed."""


class RestoreFailed(RuntimeError):
    """An intact checkpoint (its files match their SHA-256) that could not be restored: a bug
    or a library change, not damage, so nothing is ever set aside for it."""


def _disk_full(e: BaseException) -> bool:
    """Whether a save failed for want of disk space: an OSError, or orbax's and TensorStore's
    ValueError carrying the system's message."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(e) or "os_error_code='28'" in str(e)


class _OrbaxThreadErrors(logging.Filter):
    """Orbax logs an exception of its writing threads as an ERROR before it re-raises it in
    the caller; the caller reports it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in record.getMessage()


@contextlib.contextmanager
def _quiet_orbax_threads():
    logger, only = logging.getLogger("absl"), _OrbaxThreadErrors()
    logger.addFilter(only)
    try:
        yield
    finally:
        logger.removeFilter(only)


# Beside orbax's files in each step's folder: the SHA-256 of every file it wrote, so that a
# failed restore can tell damaged files from a failure of the code reading them.
MANIFEST = "files.sha256.json"


def _leaves(tree) -> dict:
    """{'params/conv1/kernel/value': leaf, ...}: plain string keys survive any orbax round trip."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def flatten(tree) -> dict[str, np.ndarray]:
    """The tree's arrays on the host, by `_leaves`' keys."""
    return {key: np.asarray(leaf) for key, leaf in _leaves(tree).items()}


def unflatten(template, flat: dict[str, np.ndarray], where: str = "checkpoint"):
    """Fills `template`'s structure from `flat`, checking every key, shape and dtype.

    The template's leaves need only shapes and dtypes (jax.ShapeDtypeStruct will do).
    """
    expected = _leaves(template)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise CheckpointError(f"{where} lacks {missing[0]} ({len(missing)} arrays missing)")
    for key, ref in expected.items():
        got = flat[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            got_s = f"{got.dtype}{list(got.shape)}"
            ref_s = f"{np.dtype(ref.dtype)}{list(ref.shape)}"
            raise CheckpointError(f"{where}: {key} is {got_s}, expected {ref_s}")
    leaves = [flat[k] for k in expected]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def params_digest(params) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key, value in sorted(flatten(params).items()):
        value = np.ascontiguousarray(value)
        h.update(f"{key}|{value.dtype.str}|{value.shape}\n".encode())
        h.update(value.tobytes())
    return h.hexdigest()


class Checkpoints:
    """The checkpoints of one run folder: keeps the latest `keep_latest` and the best one."""

    def __init__(self, workdir: Path | str, keep_latest: int = 2, read_only: bool = False):
        # Orbax needs absolute paths, whatever the user typed.
        self.directory = Path(workdir).resolve() / "checkpoints"
        self.keep_latest, self.read_only = keep_latest, read_only
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        if not self.read_only and distributed.is_main():
            self._remove_unfinished()
        return self._manager()

    def reload(self) -> None:
        """Sees the steps as they are now on disk (after another process changed them)."""
        self.manager.reload()

    def _remove_unfinished(self) -> None:
        """Removes the folders of saves that never finished (a killed process, a full disk):
        orbax ignores them, and they hold space. Only one trainer has the folder (its lock),
        so none of them is being written now."""
        if self.directory.is_dir():
            for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)

    def _manager(self) -> ocp.CheckpointManager:
        policy = policies.AnyPreservationPolicy(
            [
                policies.LatestN(self.keep_latest),
                # Only runs with a validation split score their checkpoints; LatestN keeps the
                # rest (picking by the test split would make the test figure optimistic).
                policies.BestN(
                    get_metric_fn=lambda m: m["val_accuracy"],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # Saves are small (a few MB) and synchronous, so an exit can never lose one.
            enable_async_checkpointing=False,
            # Reading must not create folders; orbax's read_only mode only adds log noise.
            create=not self.read_only,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: RunMeta, val_accuracy: float | None = None):
        meta = dataclasses.replace(
            meta,
            step=int(step),
            val_accuracy=val_accuracy,
            params_sha256=params_digest(state.weights),
            # Everything a resume reads: a damaged optimizer state would otherwise restore
            # silently and turn the loss into NaN a few steps later.
            state_sha256=params_digest(state),
        )
        metrics = None if val_accuracy is None else {"val_accuracy": float(val_accuracy)}
        flat = flatten(state)
        self._check_space(int(step), sum(a.nbytes for a in flat.values()))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta.to_json())
        )
        try:
            with _quiet_orbax_threads():  # every process saves: orbax writes and syncs them
                self.manager.save(int(step), args=args, metrics=metrics, force=True)
                self.manager.wait_until_finished()
            if distributed.is_main():
                _write_manifest(self.directory / str(int(step)))
            distributed.barrier(f"cnn-jax: step {step} saved")
        except Exception as e:
            if not _disk_full(e):
                raise
            self._drop_unfinished(int(step))
            raise DiskFull(self._no_space(step)) from None

    def _check_space(self, step: int, nbytes: int) -> None:
        """Refuses a save the disk cannot hold before writing a byte of it: a failed one leaves
        orbax's threads writing for a while after the error."""
        free = shutil.disk_usage(self.directory).free
        if distributed.count() > 1:  # process 0's disk decides for all (MiB: 32-bit integers)
            free = distributed.from_main(free // 2**20) * 2**20
        needed = int(nbytes * 1.05) + 2**20  # the arrays, plus orbax's and our small files
        if needed > free:
            raise DiskFull(self._no_space(step, f"it needs {needed / 1e6:.1f} MB, "
                                                f"{free / 1e6:.1f} MB are free"))  # fmt: skip

    def _no_space(self, step: int, sizes: str = "") -> str:
        return (
            f"no space left on the disk of {self.directory}{f' ({sizes})' if sizes else ''}: "
            f"step {step} was not saved (the earlier checkpoints are intact); free some space "
            "and run the same command again"
        )

    def _drop_unfinished(self, step: int) -> None:
        """Removes what a failed save of `step` left: the space it holds is what is missing."""
        with contextlib.suppress(Exception):  # the failed save's own error, reported already
            self.manager.close()
        if not (self.directory / str(step) / MANIFEST).is_file():  # renamed, not finished
            shutil.rmtree(self.directory / str(step), ignore_errors=True)
        self.manager = self._open()

    def read_meta(self, step: int) -> RunMeta:
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            return RunMeta.from_json(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            why = str(e) if isinstance(e, ValueError) and str(e).startswith("meta") else None
            raise CheckpointError(self._corrupt(step, why or f"unreadable meta ({e})")) from None

    def set_aside(self, step: int) -> Path:
        """Moves a step's folder out of the checkpoints (to checkpoints-set-aside/) and returns
        where it went, so that training can go on past a corrupt step without losing it."""
        self.manager.close()
        aside = self.directory.parent / "checkpoints-set-aside"
        aside.mkdir(exist_ok=True)
        target = aside / str(step)
        n = 1
        while target.exists():
            target, n = aside / f"{step}.{n}", n + 1
        shutil.move(self.directory / str(step), target)
        self.manager = self._open()
        return target

    def restore(self, step: int, template) -> tuple[Any, RunMeta]:
        """The state at `step`, shaped like `template`, with its meta; verified by digest."""
        meta = self.read_meta(step)
        # The arrays' files are checked before orbax reads them: handed a damaged file, it
        # leaves failed asyncio tasks that print tracebacks whenever they are collected.
        self.verify(step, only="state/")
        target = {k: np.zeros(v.shape, v.dtype) for k, v in _leaves(template).items()}
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target, strict=False)),
            )
            flat = {k: np.asarray(v) for k, v in restored["state"].items()}
        except Exception as e:  # orbax raises many kinds for damaged files
            other = self._other_shapes(step, template)
            if other:
                raise OtherNetwork(other) from None
            damage = _damage(self.directory / str(step), e)
            if damage is None:
                raise RestoreFailed(
                    f"checkpoint step {step} in {self.directory} is intact (every file matches "
                    f"its SHA-256) but could not be restored ({_first_line(e)}); nothing was "
                    "moved: this version of cnn-jax or orbax cannot read it"
                ) from e
            raise CheckpointError(self._corrupt(step, damage)) from None
        state = unflatten(template, flat, f"checkpoint step {step}")
        if params_digest(state.weights) != meta.params_sha256:
            raise CheckpointError(self._corrupt(step, "parameters do not match their SHA-256"))
        if (meta.state_sha256 or params_digest(state)) != params_digest(state):
            raise CheckpointError(
                self._corrupt(step, "the training state does not match its SHA-256")
            )
        return state, meta

    def verify(self, step: int, only: str = "") -> None:
        """Raises CheckpointError when a file of the step (under `only`) is missing or does not
        match its SHA-256: the damage check of `restore`, without reading the arrays."""
        damage = _damage(self.directory / str(step), RuntimeError("not read"), only)
        if damage is not None:
            raise CheckpointError(self._corrupt(step, damage))

    def best_step(self) -> int | None:
        """The step with the highest validation accuracy; the latest when none has one (a run
        without a validation split: its last epoch is its model)."""
        scored = []
        for step in self.steps():
            acc = self.read_meta(step).val_accuracy
            if acc is not None:
                scored.append((acc, step))
        if scored:
            return max(scored)[1]
        steps = self.steps()
        return steps[-1] if steps else None

    def clear(self) -> None:
        """Deletes every checkpoint of the run (for --restart)."""
        self.manager.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.manager = self._open()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _other_shapes(self, step: int, template) -> str | None:
        """Why a readable step does not fit `template`: it holds another network than the run's
        config builds (Model 3 of 418957f and before had one convolution per block), which is
        not damage. None if its arrays fit (by `unflatten`'s check), or cannot be listed."""
        logger = logging.getLogger("absl")  # orbax warns of a metadata file it does not need
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            stored = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
            unflatten(template, stored.item_metadata.tree, "it")
            return None
        except CheckpointError as mismatch:
            return (
                f"checkpoint step {step} in {self.directory} holds another network than its "
                f"run's config builds ({mismatch}): another version of cnn-jax saved it (Model 3 "
                "of 418957f and before had one convolution per block); use that version, or "
                "train again (--restart)"
            )
        except Exception:
            return None
        finally:
            logger.setLevel(level)

    def _corrupt(self, step: int, why: str) -> str:
        return f"checkpoint step {step} in {self.directory} is corrupt or incomplete: {why}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_manifest(step_dir: Path) -> None:
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {str(p.relative_to(step_dir)): _sha256(p) for p in files}
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(digests, indent=1) + "\n")
    tmp.replace(step_dir / MANIFEST)


def _damage(step_dir: Path, error: Exception, only: str = "") -> str | None:
    """Why a step that failed to restore is damaged, or None when it is not.

    Damaged: a file it wrote is missing, unreadable or changed (by its manifest); `only`
    limits the check to the files under that prefix. A step saved before manifests existed
    counts as damaged only when the failure is one of reading files.
    """
    try:
        expected = json.loads((step_dir / MANIFEST).read_text())
    except FileNotFoundError:
        readable = not isinstance(error, OSError | ValueError | EOFError)
        return None if readable else _first_line(error)
    except (OSError, ValueError) as e:
        return f"its file list {MANIFEST} is unreadable ({_first_line(e)})"
    for name, digest in expected.items():
        if not name.startswith(only):
            continue
        try:
            if _sha256(step_dir / name) != digest:
                return f"{name} does not match its SHA-256"
        except OSError as e:
            return f"{name} cannot be read ({_first_line(e)})"
    return None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def locate(path: Path | str) -> tuple[Checkpoints, int]:
    """A run folder, its checkpoints/ folder or one step's folder -> (checkpoints, step).

    For a run folder the best checkpoint is chosen, for a step folder that step.
    """
    path = Path(path).resolve()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.parent.name == "checkpoints" and path.name.isdigit():
        store = Checkpoints(path.parent.parent, read_only=True)
        if int(path.name) not in store.steps():
            raise CheckpointError(f"{path} is not a complete checkpoint")
        return store, int(path.name)
    workdir = path.parent if path.name == "checkpoints" else path
    if not (workdir / "checkpoints").is_dir():
        raise CheckpointError(f"{path} holds no checkpoints/ folder: give a run folder or a step")
    store = Checkpoints(workdir, read_only=True)
    step = store.best_step()
    if step is None:
        raise CheckpointError(f"{workdir / 'checkpoints'} holds no complete checkpoint")
    return store, step
