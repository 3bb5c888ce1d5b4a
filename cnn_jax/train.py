"""`fit`: split the data, restore or start, run the epochs with their callbacks, evaluate,
write the run's JSON.

The parts live beside it: steps.py (the compiled steps), callbacks.py (what happens between
them), run_store.py (resume and save), checkpoint.py (orbax).
"""

import contextlib
import dataclasses
import resource
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from flax import nnx

from cnn_jax import backend, distributed, files, mirror, parallel
from cnn_jax import callbacks as cb
from cnn_jax import data as data_lib
from cnn_jax.callbacks import (
    Interrupted,  # noqa: F401  (callers catch it from here)
    prior_entropy,
)
from cnn_jax.config import Config
from cnn_jax.distill import load_teacher, teacher_targets
from cnn_jax.errors import UserError
from cnn_jax.models import count_params
from cnn_jax.optim import schedule
from cnn_jax.predictor import ceil_div, evaluate, padded_order
from cnn_jax.report import EpochSums, Scalars, strict_json
from cnn_jax.run_store import Position, RunStore, data_fingerprint
from cnn_jax.steps import Trainer, create_trainer, member_seeds


class Split(NamedTuple):
    """One side of the run's data, on the devices."""

    images: Any
    labels: Any  # with --distill-from, (labels, the teacher's probabilities or weights)

    def __len__(self) -> int:
        return len(self.images)


def fit(
    config: Config,
    dataset: data_lib.Dataset,
    workdir: Path | None = None,
    verbose: bool = True,
    *,
    restart: bool = False,
    resume_fallback: bool = False,
    save_every: int | None = None,
    should_stop=None,
    log_every: int = 100,
    callbacks=(),
):
    """Splits the data, trains, evaluates on the test split; returns (state, metrics).

    With a workdir: config.json, metrics.json, TensorBoard scalars (every `log_every` steps
    and every epoch) and a checkpoint after every epoch (and every `save_every` steps); a
    workdir holding checkpoints is resumed from its latest. `should_stop()` is polled before
    the first compiled call, after each, and before the final test: True saves a checkpoint
    and raises `Interrupted`. A loss that becomes NaN or infinite raises `Diverged` at once,
    saving nothing. `callbacks` (callbacks.Callback) run after the built-in ones. With
    `config.val_size` the epoch best on the validation split is the run's model (its weights
    tested and returned in `metrics`); without, the last.
    """
    run = _prepare(config, dataset)
    verbose = verbose and distributed.is_main()  # one process speaks (and writes) for the run
    say = print if verbose else (lambda *a, **k: None)
    with contextlib.ExitStack() as resources:  # closed however the run ends
        loop = cb.Loop(config, run.trainer, run.steps_per_epoch)
        state, position = _open_run(loop, run, dataset, workdir, resources, restart,
                                    resume_fallback, say)  # fmt: skip
        hooks, pick, stuck = _callbacks(loop, run, verbose, save_every, should_stop, log_every)
        hooks = cb.CallbackList([*hooks, *callbacks])
        hooks.on_train_begin(loop)
        _stop_if_asked(loop, should_stop, state, position)  # a signal while it compiled, say
        step_ms = []
        for epoch in range(position.epoch, config.epochs):
            start = position.step_in_epoch if epoch == position.epoch else 0
            state, ms = _run_epoch(loop, hooks, run, state, epoch, start)
            step_ms += ms[1:] if epoch == position.epoch else ms  # the first call compiles
            if loop.stop_training:
                break
        _stop_if_asked(loop, should_stop, state, Position(len(loop.epochs), 0))
        metrics = _finish(loop, run, state, pick, stuck, step_ms)
        hooks.on_train_end(loop, metrics)
    return state, metrics


class _Run(NamedTuple):
    """A run's parts before its first step: the trainer, the state, the splits on the devices
    and what metrics.json says of them."""

    trainer: Trainer
    state: Any
    steps_per_epoch: int
    train: Split
    val: Split
    test: Split
    metrics: dict
    prior: float  # the class-prior entropy of the training split, for StuckWarning


def _prepare(config: Config, dataset: data_lib.Dataset) -> _Run:
    num_classes = _num_classes(config, dataset)
    indices = data_lib.split_run(config, dataset)
    if len(indices[0]) < num_classes:  # --val-size 0.99, say: one image to learn 43 classes
        raise UserError(
            f"the training split holds {len(indices[0])} images, fewer than the {num_classes} "
            "classes: lower --test-size or --val-size, or give more images"
        )
    steps_per_epoch = ceil_div(len(indices[0]), config.batch_size)
    trainer, state = create_trainer(_batch_for(config, len(indices[0])), num_classes,
                                    steps_per_epoch)  # fmt: skip
    placed = trainer.place(tuple((dataset.images[i], dataset.labels[i]) for i in indices))
    train, val, test = (Split(*p) for p in placed)
    if config.distill_views:
        teacher = load_teacher(config, dataset, indices, num_classes, config.distill_from[0])
        trainer = dataclasses.replace(trainer, teacher=teacher.predictor)
        train = Split(train.images, (train.labels, trainer.place(teacher.params)))
    elif config.distill_from:
        targets = trainer.place(teacher_targets(config, dataset, indices, num_classes))
        train = Split(train.images, (train.labels, targets))
    metrics = {
        "model": config.model,
        "params": count_params(nnx.merge(trainer.graphdef, state.weights)) // config.ensemble,
        "ensemble": config.ensemble,
        "num_classes": num_classes,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "skipped_files": [{"path": p, "reason": r} for p, r in dataset.skipped],
        **_device_record(trainer, config),
        "epochs": [],
    }
    prior = prior_entropy(dataset.labels[indices[0]], num_classes)
    return _Run(trainer, state, steps_per_epoch, train, val, test, metrics, prior)


def _open_run(loop, run, dataset, workdir, resources, restart, fallback, say):
    """The state and position to start from: the workdir's latest checkpoint or the start;
    opens the run folder's checkpoints and TensorBoard files into `resources`."""
    config, state, position = loop.config, run.state, Position(0, 0)
    if workdir is None:
        return state, position
    files.refuse_inside(workdir, config.data, "the data folder", "--workdir")
    # The fingerprint hashes every pixel: only runs that checkpoint need it.
    fingerprint = data_fingerprint(dataset)
    distributed.check_same("data", fingerprint)
    store = RunStore(workdir, config, run.metrics["num_classes"], fingerprint,
                     run.steps_per_epoch)  # fmt: skip
    loop.store = resources.enter_context(contextlib.closing(store))
    resumed = store.resume(state, restart, fallback)
    if resumed is not None:
        _check_epochs_left(resumed.position, config, store.workdir)
        state, position, loop.epochs = run.trainer.place(resumed.state), *resumed[1:]
        say(f"resuming {store.workdir} from step {position.global_step(run.steps_per_epoch)} "
            f"(epoch {position.epoch + 1}, step {position.step_in_epoch})")  # fmt: skip
    if distributed.is_main():
        config.write(store.workdir / "config.json")
        loop.scalars = resources.enter_context(contextlib.closing(Scalars(store.workdir)))
    return state, position


def _check_epochs_left(done: Position, config: Config, workdir: Path) -> None:
    if done.epoch > config.epochs or (done.epoch == config.epochs and done.step_in_epoch):
        steps = f" and {done.step_in_epoch} steps" if done.step_in_epoch else ""
        raise UserError(
            f"the run in {workdir} has trained {done.epoch} epochs{steps}; --epochs "
            f"{config.epochs} is fewer: give --epochs {done.epoch + 1} or more to go on, or "
            "--restart / another --workdir"
        )


def _callbacks(loop, run, verbose, save_every, should_stop, log_every):
    """The built-in callbacks, in the order they run (the NaN check before any save; the
    evaluations before what reports them), and the two whose results `_finish` reads."""
    rate = schedule(loop.config, run.steps_per_epoch)
    lr_at = rate if callable(rate) else (lambda step: rate)
    pick = cb.ValidationPick(*run.val) if len(run.val) else None
    test = cb.Evaluation("test", *run.test) if loop.config.eval_every_epoch else None
    stuck = cb.StuckWarning(run.prior, test)
    hooks = [
        cb.DivergenceGuard(),
        cb.ProgressBar(verbose),
        cb.StepScalars(log_every, lr_at),
        cb.PeriodicCheckpoint(save_every),
        cb.StopOnRequest(should_stop),
        *(c for c in (pick, test) if c is not None),
        stuck,
        cb.EpochScalars(len(run.train), lr_at),
        cb.EpochCheckpoint(),
    ]
    return hooks, pick, stuck


def _run_epoch(loop, hooks, run, state, epoch: int, start: int):
    """Steps `start`.. of one epoch, then its evaluations and record; (state, ms per step of
    each call). Raises Interrupted, after a checkpoint, when a callback asked for it."""
    loop.epoch = epoch
    hooks.on_epoch_begin(loop, epoch)
    t0 = time.perf_counter()
    state, ms, done = _train_calls(loop, hooks, run, state, start)
    if done < run.steps_per_epoch:  # interrupted mid-epoch
        _interrupt(loop, state, Position(epoch, done))
    record = _epoch_record(state, time.perf_counter() - t0)
    hooks.on_epoch_end(loop, epoch, record, state)
    loop.epochs.append(record)
    if loop.interrupted:  # on the epoch's last step: its checkpoint is the one to resume
        _interrupt(loop, state, Position(epoch + 1, 0))
    return state, ms


def _train_calls(loop, hooks, run, state, start: int):
    """The epoch's compiled calls from step `start`, `on_calls_end` after each; stops early
    when a callback interrupts. Returns (state, ms per step of each call, steps done)."""

    def after(begin, end, state):
        hooks.on_calls_end(loop, begin, end, state)
        return loop.interrupted

    order = epoch_order(loop.config.seed, loop.epoch, len(run.train))
    seeds = member_seeds(loop.config)
    return train_epoch(run.trainer, state, *run.train, order, seeds, start=start, after_call=after)


def train_epoch(trainer, state, images, labels, order, seed, *, start=0, after_call=None):
    """Steps `start`.. of one pass over `order`, `trainer.steps_per_call` per compiled call;
    `after_call(begin, end, state)` returning True stops there. Returns (state, ms per step
    of each call, steps done in the epoch)."""
    n, steps = len(order), ceil_div(len(order), trainer.batch_size)
    padded = trainer.place(padded_order(order, trainer.batch_size))
    if start == 0:
        state = state._replace(metrics=trainer.place(np.zeros(state.metrics.shape, np.float32)))
    step = trainer.train_step if trainer.steps_per_call == 1 else trainer.train_steps
    ms, i = [], start
    while i < steps:
        t0 = time.perf_counter()
        state = step(state, images, labels, padded, n, i, seed)
        state.metrics.block_until_ready()  # costs little, and makes the step times honest
        begin, i = i, min(i + trainer.steps_per_call, steps)
        ms.append((time.perf_counter() - t0) * 1e3 / (i - begin))
        if after_call is not None and after_call(begin, i, state):
            break
    return state, ms, i


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of an epoch: a seeded permutation, reproducible on resume."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _stop_if_asked(loop, should_stop, state, where: Position) -> None:
    """Between the steps, the callbacks poll a stop request; before the first step and before
    the final test, this does: a signal there stops the run, resumable from `where`."""
    if should_stop is not None and should_stop():
        _interrupt(loop, state, where)


def _interrupt(loop, state, where: Position):
    if loop.store is not None and not loop.store.has(where):
        loop.store.save(where, state, loop.epochs)
    saved = f"; checkpoint saved in {loop.store.directory}" if loop.store is not None else ""
    raise Interrupted(
        f"stopped at step {where.global_step(loop.steps_per_epoch)} (epoch {where.epoch + 1}, "
        f"step {where.step_in_epoch} of {loop.steps_per_epoch}){saved}"
    )


def _finish(loop, run, state, pick, stuck, step_ms) -> dict:
    """The run's model (the best validation epoch's, or the last), tested; metrics.json."""
    metrics = dict(run.metrics, epochs=loop.epochs, selected_epoch=len(loop.epochs))
    weights = state.weights
    if pick is not None:
        # The checkpoints know the epochs before a resume too; without them, memory does.
        best = (loop.store.best(state) if loop.store is not None else None) or pick.best
        if best is not None:
            weights, metrics["selected_epoch"] = run.trainer.predictor.place(best[2]), best[1]
            metrics["val_accuracy"] = best[0]
    ev = evaluate(run.trainer.predictor, weights, *run.test)
    if state.ema is not None and pick is None:  # what the average changed, on the same run
        last = evaluate(run.trainer.predictor, state.last_weights, *run.test)
        metrics.update(
            last_weights_test_loss=last["loss"], last_weights_test_accuracy=last["accuracy"]
        )
    if "member_accuracy" in ev:
        metrics["member_test_accuracy"] = ev["member_accuracy"]
    metrics.update(
        test_loss=ev["loss"],
        test_accuracy=ev["accuracy"],
        median_step_ms=statistics.median(step_ms) if step_ms else None,
        # the process's peak resident memory so far (Linux reports KiB)
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        warnings=[stuck.warning] if stuck.warning else [],
    )
    if loop.store is not None and distributed.is_main():
        metrics["checkpoints"] = str(loop.store.directory)
        files.write_whole(loop.store.workdir / "metrics.json", strict_json(metrics) + "\n")
    return metrics


def _epoch_record(state, seconds: float) -> dict[str, float]:
    # An ensemble's figures are its members' means.
    sums = EpochSums.of(state.metrics)
    return {"train_loss": sums.mean_loss, "train_accuracy": sums.accuracy, "seconds": seconds}


def _batch_for(config: Config, n_train: int) -> Config:
    """A batch larger than the training split is one batch of the whole split (as Keras runs
    it) computed at the split's size, rounded up to a multiple of the devices: padding it to
    the asked size would compute the same update in up to thousands of times the work."""
    if config.batch_size <= n_train:
        return config
    devices = parallel.create_mesh(config.devices, backend.resolve_platform(config.platform)).size
    batch = ceil_div(n_train, devices) * devices
    return dataclasses.replace(config, batch_size=min(batch, config.batch_size))


def _num_classes(config: Config, dataset: data_lib.Dataset) -> int:
    """The output size; the data must hold images of every class id below its largest."""
    present = np.unique(dataset.labels)
    if len(present) < 2:
        raise data_lib.DataError(
            f"the data holds images of one class only ({present[0] if len(present) else 'none'}):"
            " a classifier needs at least two"
        )
    missing = sorted(set(range(int(present[-1]) + 1)) - set(present.tolist()))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise data_lib.DataError(
            f"no images of class {shown}: training needs images of every class id from 0 to "
            f"{present[-1]} (an empty class folder, or ids that skip numbers?)"
        )
    num_classes = config.num_classes or dataset.num_classes
    if dataset.num_classes > num_classes:
        raise UserError(
            f"the data has class ids up to {dataset.num_classes - 1}, more than "
            f"--num-classes {num_classes}"
        )
    if config.augment and config.strengths.flip and num_classes != mirror.GTSRB_CLASSES:
        raise UserError(
            f"--aug-flip knows GTSRB's {mirror.GTSRB_CLASSES} classes only; this run has "
            f"{num_classes}"
        )
    return num_classes


def _device_record(trainer: Trainer, config: Config) -> dict[str, Any]:
    """Where the run trains, for metrics.json: platform, devices, and how."""
    device = trainer.mesh.devices.flat[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": trainer.mesh.size,
        "processes": distributed.count(),
        "devices_per_process": trainer.mesh.size // distributed.count(),
        "steps_per_call": trainer.steps_per_call,
        "precision": config.precision,
        "deterministic": backend.repeats(device.platform, trainer.deterministic),
        "convolutions": "onednn" if trainer.onednn else "xla",
    }
