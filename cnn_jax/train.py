"""`fit`: split the data, restore or start, run the epochs, evaluate, write the run's JSON.

The parts live beside it: steps.py (the compiled steps), loop.py (one epoch), run_store.py
(resume and save), checkpoint.py (orbax).
"""

import dataclasses
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from cnn_jax import backend, parallel
from cnn_jax import data as data_lib
from cnn_jax.config import Config
from cnn_jax.guards import Diverged, prior_entropy, stuck_advice, stuck_reason
from cnn_jax.loop import Interrupted, epoch_order, train_epoch
from cnn_jax.models import count_params
from cnn_jax.optim import schedule
from cnn_jax.predictor import ceil_div, evaluate
from cnn_jax.report import Progress, Scalars, running, strict_json
from cnn_jax.run_store import Position, RunStore, data_fingerprint
from cnn_jax.sources import split_run
from cnn_jax.steps import Trainer, create_trainer, member_seeds


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
):
    """Splits the data, trains, evaluates on the test split; writes config and metrics JSON.

    With a workdir, a checkpoint is saved after every epoch (and every `save_every` steps), and
    a workdir that already holds checkpoints is resumed from its latest one. `should_stop()`
    is polled after every compiled call; when it returns True a checkpoint is saved and
    `Interrupted` is raised. A loss that becomes NaN or infinite raises `Diverged` at once,
    without saving that state. The workdir also gets TensorBoard scalars: every `log_every`
    steps and every epoch.

    With `config.val_size` the weights of the epoch best on the validation split are the
    result (tested, returned in `metrics`, and the checkpoint `evaluate RUN` uses); without,
    those of the last epoch.
    """
    num_classes = _num_classes(config, dataset)
    train_idx, val_idx, test_idx = split_run(config, dataset)
    steps_per_epoch = ceil_div(len(train_idx), config.batch_size)
    run_config = _batch_for(config, len(train_idx))
    trainer, state = create_trainer(run_config, num_classes, steps_per_epoch)
    train_images, train_labels, val_images, val_labels, test_images, test_labels = trainer.place(
        tuple(
            a[i] for i in (train_idx, val_idx, test_idx) for a in (dataset.images, dataset.labels)
        )
    )
    metrics = {
        "model": config.model,
        "params": count_params(nnx.merge(trainer.graphdef, state.weights)) // config.ensemble,
        "ensemble": config.ensemble,
        "num_classes": num_classes,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "n_test": len(test_idx),
        "skipped_files": [{"path": p, "reason": r} for p, r in dataset.skipped],
        **_device_record(trainer, config),
        "epochs": [],
    }
    say = print if verbose else (lambda *a, **k: None)
    prior = prior_entropy(dataset.labels[train_idx], num_classes)
    rate = schedule(config, steps_per_epoch)
    lr_at = rate if callable(rate) else (lambda step: rate)
    if metrics["platform"] == "gpu" and config.deterministic != backend.deterministic_ops():
        say(
            f"warning: deterministic GPU ops are {'off' if config.deterministic else 'on'} in "
            "this process (XLA_FLAGS is read when JAX starts): see cnn_jax.backend"
        )
    store, scalars, position = None, None, Position(0, 0)
    if workdir is not None:
        # The fingerprint hashes every pixel: only runs that checkpoint need it.
        fingerprint = data_fingerprint(dataset)
        store = RunStore(workdir, config, num_classes, fingerprint, steps_per_epoch)
        resumed = store.resume(state, restart, resume_fallback, say)
        if resumed is not None:
            done = resumed.position
            if done.epoch > config.epochs or (done.epoch == config.epochs and done.step_in_epoch):
                store.close()
                raise ValueError(
                    f"the run in {store.workdir} has trained {done.epoch} epochs"
                    f"{f' and {done.step_in_epoch} steps' if done.step_in_epoch else ''}; "
                    f"--epochs {config.epochs} is fewer: give --epochs {done.epoch + 1} or more to "
                    "go on, or --restart / another --workdir"
                )
            state = trainer.place(resumed.state)  # host arrays: any device count works
            position, metrics["epochs"] = resumed.position, resumed.epochs
            say(f"resuming {store.workdir} from step {position.global_step(steps_per_epoch)} "
                f"(epoch {position.epoch + 1}, step {position.step_in_epoch})")  # fmt: skip
        config.write(store.workdir / "config.json")
        scalars = Scalars(store.workdir)

    step_ms, best = [], None  # best: (val accuracy, epoch, host weights)
    for epoch in range(position.epoch, config.epochs):
        start = position.step_in_epoch if epoch == position.epoch else 0
        progress = Progress(epoch, config.epochs, steps_per_epoch, verbose)

        def between_calls(begin, end, state, epoch=epoch, progress=progress):
            progress.update(end, state.metrics)
            step = Position(epoch, end).global_step(steps_per_epoch)
            loss, accuracy, _ = running(state.metrics)
            if not np.isfinite(loss):  # checked before any save: a NaN state is never kept
                progress.interrupt()
                _diverged(store, scalars, Position(epoch, end), steps_per_epoch, loss)
            if scalars is not None and step // log_every > (step - end + begin) // log_every:
                scalars.add(step, **{"steps/train_loss": loss, "steps/train_accuracy": accuracy,
                                     "steps/learning_rate": lr_at(step)})  # fmt: skip
            # A save when a call crosses a multiple of save_every (a call may run many steps);
            # the epoch's last step is saved by the epoch-end checkpoint below.
            crossed = save_every and step // save_every > (step - end + begin) // save_every
            if store is not None and crossed and end < steps_per_epoch:
                store.save(Position(epoch, end), state, metrics["epochs"])
            return should_stop is not None and should_stop()

        t0 = time.perf_counter()
        order = epoch_order(config.seed, epoch, len(train_idx))
        state, ms, done, stopped = train_epoch(
            trainer, state, train_images, train_labels, order, member_seeds(config),
            start=start, between_calls=between_calls,
        )  # fmt: skip
        # The run's first call compiles: left out, also when an epoch is one call.
        step_ms += ms[1:] if epoch == position.epoch else ms
        if done < steps_per_epoch:  # stopped on request mid-epoch
            where = Position(epoch, done)
            if store is not None and not store.has(where):
                store.save(where, state, metrics["epochs"])
            progress.interrupt()
            _interrupted(store, scalars, where, steps_per_epoch)
        record = _epoch_record(state, time.perf_counter() - t0)
        if len(val_idx):
            ev = evaluate(trainer.predictor, state.weights, val_images, val_labels)
            record.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
            if best is None or ev["accuracy"] >= best[0]:  # a tie: the later, as in best_step
                best = (ev["accuracy"], epoch + 1, jax.device_get(state.weights))
        if config.eval_every_epoch or store is not None:
            ev = evaluate(trainer.predictor, state.weights, test_images, test_labels)
            record.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        progress.close(record)
        metrics["epochs"].append(record)
        tested = ev["predictions"] if "test_accuracy" in record else None
        _warn_if_stuck(metrics, prior, tested, config)
        if scalars is not None:
            end = Position(epoch + 1, 0).global_step(steps_per_epoch)
            _log_epoch(scalars, end, record, len(train_idx), lr_at(end))
        if store is not None:
            val = record.get("val_accuracy")
            store.save(Position(epoch + 1, 0), state, metrics["epochs"], val)
        if stopped:  # on the epoch's last step: the epoch-end checkpoint is the one to resume
            _interrupted(store, scalars, Position(epoch + 1, 0), steps_per_epoch)
    weights, metrics["selected_epoch"] = state.weights, config.epochs
    if len(val_idx):
        # The checkpoints know the epochs before a resume too; without them, memory does.
        best = (store.best(state) if store is not None else None) or best
        if best is not None:
            weights, metrics["selected_epoch"] = trainer.predictor.place(best[2]), best[1]
            metrics["val_accuracy"] = best[0]
    ev = evaluate(trainer.predictor, weights, test_images, test_labels)
    if "member_accuracy" in ev:
        metrics["member_test_accuracy"] = ev["member_accuracy"]
    metrics.update(
        test_loss=ev["loss"],
        test_accuracy=ev["accuracy"],
        median_step_ms=statistics.median(step_ms) if step_ms else None,
        # the process's peak resident memory so far (Linux reports KiB)
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if store is not None:
        store.close()
        scalars.close()
        metrics["checkpoints"] = str(store.directory)
        (store.workdir / "metrics.json").write_text(strict_json(metrics) + "\n")
    return state, metrics


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
        raise ValueError(
            f"the data has class ids up to {dataset.num_classes - 1}, more than "
            f"--num-classes {num_classes}"
        )
    return num_classes


def _epoch_record(state, seconds: float) -> dict[str, float]:
    # An ensemble's rows, one per member, add up to its members' mean loss and accuracy.
    loss_sum, correct, count = np.asarray(state.metrics).reshape(-1, 3).sum(0)
    return {
        "train_loss": float(loss_sum / count),
        "train_accuracy": float(correct / count),
        "seconds": seconds,
    }


def _device_record(trainer: Trainer, config: Config) -> dict[str, Any]:
    """Where the run trains, for metrics.json: platform, devices, and how."""
    device = trainer.mesh.devices.flat[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": trainer.mesh.size,
        "steps_per_call": trainer.steps_per_call,
        "precision": config.precision,
        # CPU runs repeat bit for bit anyway; on a GPU it takes XLA's deterministic ops.
        "deterministic": device.platform == "cpu" or backend.deterministic_ops(),
    }


def _warn_if_stuck(metrics: dict, prior: float, predictions, config: Config) -> None:
    """Once per run: a warning on stderr and in metrics.json when the run looks stuck."""
    reason = stuck_reason(metrics["epochs"], prior, predictions)
    if reason and not metrics.setdefault("warnings", []):
        epoch = len(metrics["epochs"])
        warning = (
            f"warning: the run looks stuck after epoch {epoch}: {reason}; {stuck_advice(config)}"
        )
        print(warning, file=sys.stderr, flush=True)
        metrics["warnings"].append(warning)


def _log_epoch(scalars: Scalars, step: int, record: dict, images: int, lr: float) -> None:
    values = {f"epoch/{k}": v for k, v in record.items() if k != "seconds"}
    values["epoch/images_per_second"] = images / max(record["seconds"], 1e-9)
    scalars.add(step, **values, **{"epoch/learning_rate": lr})


def _diverged(store, scalars, position: Position, steps_per_epoch: int, loss: float):
    last = None
    if store is not None:
        steps = store.checkpoints.steps()
        last = (
            f"the last good checkpoint is step {steps[-1]} in {store.directory}"
            if steps
            else "no checkpoint was saved before it"
        )
        store.close()
        scalars.close()
    where = position.global_step(steps_per_epoch)
    raise Diverged(
        f"the training loss became {loss} by step {where} (epoch {position.epoch + 1}, step "
        f"{position.step_in_epoch} of {steps_per_epoch}); stopped without saving it"
        + (f"; {last}" if last else "")
        + ". A lower --lr usually helps (start over with --restart)"
    )


def _interrupted(store: RunStore | None, scalars, position: Position, steps_per_epoch: int):
    if store is not None:
        store.close()
        scalars.close()
    where = f"; checkpoint saved in {store.directory}" if store is not None else ""
    raise Interrupted(
        f"stopped at step {position.global_step(steps_per_epoch)} (epoch {position.epoch + 1}, "
        f"step {position.step_in_epoch} of {steps_per_epoch}){where}"
    )
