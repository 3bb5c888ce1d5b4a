"""Orbax checkpoints of a run: save, find, verify and restore. The only module that imports orbax.

A checkpoint is WORKDIR/checkpoints/<step>/ with two items:
  state: the whole training state (params, optimizer state, step, running epoch metrics) as a
         flat {path: array} dict, so it restores into any structure and onto any device count;
  meta:  JSON with the config, epoch and position in it, the metrics so far and a SHA-256 of the
         weights (parameters and batch statistics), which every restore checks.
Orbax writes each step into a temporary folder and renames it when complete, so a process killed
mid-save leaves nothing that is picked up later.
"""

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


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not fit the run."""


class OtherNetwork(CheckpointError):
    """An intact checkpoint of another architecture than the run's config builds."""


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

    def save(self, step: int, state, meta: dict[str, Any], val_accuracy: float | None = None):
        meta = dict(
            meta,
            step=int(step),
            val_accuracy=val_accuracy,
            params_sha256=params_digest(state.weights),
            # Everything a resume reads: a damaged optimizer state would otherwise restore
            # silently and turn the loss into NaN a few steps later.
            state_sha256=params_digest(state),
        )
        metrics = None if val_accuracy is None else {"val_accuracy": float(val_accuracy)}
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flatten(state)), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict[str, Any]:
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(self._corrupt(step, f"unreadable meta ({e})")) from None
        problem = _meta_problem(meta)
        if problem:
            raise CheckpointError(self._corrupt(step, problem))
        return meta

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

    def restore(self, step: int, template) -> tuple[Any, dict[str, Any]]:
        """The state at `step`, shaped like `template`, with its meta; verified by digest."""
        meta = self.read_meta(step)
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
            raise CheckpointError(self._corrupt(step, _first_line(e))) from None
        state = unflatten(template, flat, f"checkpoint step {step}")
        if params_digest(state.weights) != meta.get("params_sha256"):
            raise CheckpointError(self._corrupt(step, "parameters do not match their SHA-256"))
        if meta.get("state_sha256", params_digest(state)) != params_digest(state):
            raise CheckpointError(
                self._corrupt(step, "the training state does not match its SHA-256")
            )
        return state, meta

    def best_step(self) -> int | None:
        """The step with the highest validation accuracy; the latest when none has one (a run
        without a validation split: its last epoch is its model)."""
        scored = []
        for step in self.steps():
            acc = self.read_meta(step).get("val_accuracy")
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


# The meta fields every reader relies on, and their JSON types (bool is not an int here).
_META_FIELDS = {
    "config": dict,
    "num_classes": int,
    "epoch": int,
    "step_in_epoch": int,
    "epochs": list,
}


def _meta_problem(meta) -> str | None:
    """What is wrong with a checkpoint's meta JSON, or None: checked on every read, so that no
    command trips over a field of the wrong shape."""
    if not isinstance(meta, dict):
        return "meta is not a JSON object"
    for key, kind in _META_FIELDS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"meta field {key!r} is {json.dumps(value)[:40]}, expected a {kind.__name__}"
    if meta["num_classes"] < 1 or meta["epoch"] < 0 or meta["step_in_epoch"] < 0:
        return "meta has a negative position or no classes"
    for record in meta["epochs"]:
        numbers = isinstance(record, dict) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in record.values()
        )
        if not numbers:
            return "meta field 'epochs' holds a record that is not numbers by name"
    for key in ("val_accuracy", "test_accuracy"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            return f"meta field {key!r} is {json.dumps(value)[:40]}, expected a number"
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
