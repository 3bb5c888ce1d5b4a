"""A run folder's checkpoints as training sees them: resume or start, save, and what a resume
must keep (the settings that decide the result, and the data)."""

import contextlib
import hashlib
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cnn_jax import data as data_lib
from cnn_jax import distributed, files
from cnn_jax.config import Config, resume_changes
from cnn_jax.errors import UserError
from cnn_jax.run_meta import RunMeta


def check_resumable(saved: RunMeta, config: Config, fingerprint: str, workdir: Path) -> None:
    changes = resume_changes(saved.run_config(), config)
    if changes:
        option, now, then = changes[0]
        raise UserError(
            f"{option} is {now!r} but the run in {workdir} used {then!r}: use the same setting "
            "to resume, or --restart / another --workdir to start over"
        )
    schedule = saved.config.get("schedule", "constant")
    if schedule != "constant" and saved.config.get("epochs") != config.epochs:
        raise UserError(
            f"--epochs is {config.epochs} but the run in {workdir} used "
            f"{saved.config.get('epochs')}, and its {schedule} learning rate schedule spans "
            "them: use the same --epochs to resume, or --restart / another --workdir"
        )
    if saved.data_fingerprint != fingerprint:
        raise UserError(
            f"the data differs from the run in {workdir} (other files or labels): resume with "
            "the same data, or --restart / another --workdir to start over"
        )


def data_fingerprint(dataset: data_lib.Dataset) -> str:
    """SHA-256 of the file names, labels and pixels, to refuse resuming on other data."""
    h = hashlib.sha256("\n".join(map(str, dataset.paths)).encode(errors="surrogateescape"))
    h.update(np.ascontiguousarray(dataset.labels, np.int32).tobytes())
    h.update(np.ascontiguousarray(dataset.images).tobytes())
    return h.hexdigest()


class Position(NamedTuple):
    """Where a run stands: epochs finished, and steps done in the next one."""

    epoch: int
    step_in_epoch: int

    def global_step(self, steps_per_epoch: int) -> int:
        """The training state's `step` here, known on the host without a device sync."""
        return self.epoch * steps_per_epoch + self.step_in_epoch


class Resumed(NamedTuple):
    state: Any  # host arrays: place them on any device count
    position: Position
    epochs: list  # the per-epoch records so far


# What process 0 tells the others of a resume, besides the step it chose.
NEW, FAILED = -1, -2


class RunStore:
    """The checkpoints of one run folder, each with the meta a resume needs.

    A checkpoint holds the state and, as JSON, the config, the position, the epoch records so
    far and the data's fingerprint; it is stored under the position's global step.
    """

    def __init__(
        self, workdir, config: Config, num_classes: int, fingerprint: str, steps_per_epoch: int
    ):
        from cnn_jax.checkpoint import Checkpoints  # orbax is slow to import

        self.workdir = Path(workdir).resolve()
        self._lock = contextlib.ExitStack()
        if distributed.is_main():  # the other processes of a run only read the folder
            files.check_run_folder(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._lock.enter_context(files.locked(self.workdir))
        distributed.check_shared(self.workdir)
        self.checkpoints = Checkpoints(self.workdir)
        self.config, self.num_classes, self.fingerprint = config, num_classes, fingerprint
        self.steps_per_epoch = steps_per_epoch

    @property
    def directory(self) -> Path:
        return self.checkpoints.directory

    def resume(self, template, restart: bool, fallback: bool) -> Resumed | None:
        """The latest checkpoint (None for a new run; --restart deletes them first)."""
        store = self.checkpoints
        if distributed.count() > 1:
            return self._resume_together(template, restart, fallback)
        if restart:
            store.clear()
        if not store.steps():
            return None
        load = lambda step: store.restore(step, template)  # noqa: E731
        _, (state, meta) = newest_intact(store, fallback, self._check, load)
        return Resumed(state, Position(meta.epoch, meta.step_in_epoch), meta.epochs)

    def _resume_together(self, template, restart: bool, fallback: bool) -> Resumed | None:
        """Several processes: process 0 alone deletes (--restart), sets aside
        (--resume-fallback) and chooses the step, by its files' digests; then all of them
        restore it together (orbax restores collectively)."""
        step = FAILED
        if distributed.is_main():
            try:
                if restart:
                    self.checkpoints.clear()
                if self.checkpoints.steps():
                    step, _ = newest_intact(self.checkpoints, fallback, self._check,
                                            self.checkpoints.verify)  # fmt: skip
                else:
                    step = NEW
            finally:  # the others wait for this, whatever happened here
                distributed.from_main(step)
        else:
            step = distributed.from_main(step)
        if step == FAILED:
            raise UserError("process 0 could not resume the run: its own message says why")
        self.checkpoints.reload()
        if step == NEW:
            return None
        state, meta = self.checkpoints.restore(step, template)
        return Resumed(state, Position(meta.epoch, meta.step_in_epoch), meta.epochs)

    def _check(self, meta) -> None:
        check_resumable(meta, self.config, self.fingerprint, self.workdir)

    def save(self, position: Position, state, epochs, val_accuracy=None) -> None:
        meta = RunMeta.for_run(self.config, self.num_classes, *position, epochs,
                               data_fingerprint=self.fingerprint)  # fmt: skip
        step = position.global_step(self.steps_per_epoch)
        self.checkpoints.save(step, state, meta, val_accuracy)

    def best(self, template):
        """(validation accuracy, epoch, weights) of the checkpoint best on the validation split;
        None when no checkpoint has a validation score."""
        step = self.checkpoints.best_step()
        if step is None or self.checkpoints.read_meta(step).val_accuracy is None:
            return None
        state, meta = self.checkpoints.restore(step, template)
        return meta.val_accuracy, meta.epoch, state.weights

    def has(self, position: Position) -> bool:
        return position.global_step(self.steps_per_epoch) in self.checkpoints.steps()

    def close(self) -> None:
        try:
            self.checkpoints.close()
        finally:
            self._lock.close()


def newest_intact(store, fallback: bool, check, load):
    """(step, load(step)) of the newest checkpoint; with `fallback`, of the newest intact one
    when newer ones are damaged (each set aside). `check(meta)` runs before `load`, so a changed
    setting is named as such.
    """
    from cnn_jax.checkpoint import CheckpointError, OtherNetwork

    for step in reversed(store.steps()):
        try:
            check(store.read_meta(step))
            return step, load(step)
        except OtherNetwork:
            raise  # not damage: setting it aside and training afresh would hide the cause
        except CheckpointError as e:
            if not fallback:
                msg = f"{e}; --resume-fallback resumes from the newest intact one"
                raise CheckpointError(msg) from None
            # Moved aside, not deleted: training can save this step again, and the damaged
            # files stay for a look.
            where = store.set_aside(step)
            print(f"warning: {e}; moved it to {where}; trying an older one", file=sys.stderr)
    raise CheckpointError(f"no intact checkpoint in {store.directory}; use --restart")
