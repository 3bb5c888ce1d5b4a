"""What a training run does besides the steps, one object per concern, in Keras' shape.

`fit` calls each callback's hooks in order: `on_train_begin`, then per epoch `on_epoch_begin`,
`on_calls_end` after every compiled call (which may run many steps: `--steps-per-call`),
`on_epoch_end` with the epoch's record, and `on_train_end` with the run's metrics. A callback
stops the run by setting `loop.stop_training` (at the epoch's end, as Keras does) or asks for
an interruption with `loop.interrupt()` (a checkpoint at the current step, then
`Interrupted`). Python users pass their own to `train.fit(..., callbacks=[...])`.
"""

import dataclasses
import sys
from typing import Any

import jax
import numpy as np

from cnn_jax.predictor import evaluate
from cnn_jax.report import EpochSums, Progress, Scalars
from cnn_jax.run_store import Position, RunStore


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint."""


# The guard rails that explain a bad run: a loss that is no longer a number, and a stuck run.
# The exit code of `cnn-jax train` when the loss became NaN or infinite (2 is bad input, 130/143
# an interruption).
DIVERGED_EXIT = 3


class Diverged(Exception):
    """The loss became NaN or infinite; training stopped without saving that state."""


def prior_entropy(labels: np.ndarray, num_classes: int) -> float:
    """The loss of a network that ignores its input and predicts the class frequencies."""
    p = np.bincount(labels, minlength=num_classes) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def stuck_reason(epochs: list[dict], prior: float, predictions=None) -> str | None:
    """Why the run looks stuck after its latest epoch, or None.

    Stuck: every test prediction is one class, or the training loss sat within 0.05 of the
    class-prior entropy for two epochs in a row (one such epoch is a slow start, not a stall).
    """
    if predictions is not None and len(predictions) > 1 and len(np.unique(predictions)) == 1:
        return f"every test image is predicted as class {int(predictions[0])}"
    losses = [e["train_loss"] for e in epochs[-2:]]
    if len(losses) == 2 and all(abs(loss - prior) < 0.05 for loss in losses):
        return (
            f"the training loss sits at {losses[-1]:.3f}, the class-prior entropy "
            f"({prior:.3f}): the network predicts class frequencies, not images"
        )
    return None


def stuck_advice(config) -> str:
    hints = []
    if config.pixels == "raw":
        hints.append("--pixels unit (0..255 inputs often stall the tutorial's networks)")
    hints.append(f"a lower --lr (now {config.learning_rate:g})")
    return "usually fixed by " + " or ".join(hints)


@dataclasses.dataclass
class Loop:
    """What the callbacks see of a run: its settings, where it stands, and its outputs."""

    config: Any
    trainer: Any
    steps_per_epoch: int
    store: RunStore | None = None  # the run folder's checkpoints; None without a workdir
    scalars: Scalars | None = None  # TensorBoard event files; None without a workdir
    epochs: list = dataclasses.field(default_factory=list)  # one record per finished epoch
    epoch: int = 0  # the epoch running now (0-based)
    stop_training: bool = False  # set by a callback: the run ends after this epoch
    interrupted: bool = False  # set through interrupt(): save now, raise Interrupted

    def interrupt(self) -> None:
        self.interrupted = True

    def step(self, step_in_epoch: int) -> int:
        """The global step at a position of the current epoch."""
        return Position(self.epoch, step_in_epoch).global_step(self.steps_per_epoch)


class Callback:
    """Does nothing; subclasses override the hooks they need."""

    def on_train_begin(self, loop: Loop) -> None: ...

    def on_epoch_begin(self, loop: Loop, epoch: int) -> None: ...

    def on_calls_end(self, loop: Loop, begin: int, end: int, state) -> None:
        """After a compiled call that ran steps begin..end-1 of the current epoch."""

    def on_epoch_end(self, loop: Loop, epoch: int, record: dict, state) -> None:
        """`record` holds the epoch's figures; callbacks earlier in the list may add to it."""

    def on_train_end(self, loop: Loop, metrics: dict) -> None: ...


class CallbackList:
    """Calls a hook of each callback in turn: `callbacks.on_epoch_end(loop, ...)`."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str):
        def call(*args):
            for callback in self.callbacks:
                getattr(callback, hook)(*args)

        return call


def every(step: int, calls_steps: int, n: int | None) -> bool:
    """Whether a call that ran `calls_steps` steps up to global `step` crossed a multiple of n
    (a call may run many steps, so `step % n == 0` could miss it)."""
    return bool(n) and step // n > (step - calls_steps) // n


class DivergenceGuard(Callback):
    """Stops at once when the running loss is no longer a number, before anything saves it."""

    def on_calls_end(self, loop, begin, end, state):
        loss = EpochSums.of(state.metrics).mean_loss
        if np.isfinite(loss):
            return
        last = "no checkpoint was saved before it"
        if loop.store is not None and loop.store.checkpoints.steps():
            last = f"the last good checkpoint is step {loop.store.checkpoints.steps()[-1]} in "
            last += str(loop.store.directory)
        raise Diverged(
            f"the training loss became {loss} by step {loop.step(end)} (epoch {loop.epoch + 1}, "
            f"step {end} of {loop.steps_per_epoch}); stopped without saving it"
            + (f"; {last}" if loop.store is not None else "")
            + ". A lower --lr usually helps (start over with --restart)"
        )


class ProgressBar(Callback):
    """The tqdm bar on a terminal, one plain line per epoch when piped (report.Progress)."""

    def __init__(self, verbose: bool = True):
        self.verbose, self.bar = verbose, None

    def on_epoch_begin(self, loop, epoch):
        self.bar = Progress(epoch, loop.config.epochs, loop.steps_per_epoch, self.verbose)

    def on_calls_end(self, loop, begin, end, state):
        self.bar.update(end, state.metrics)
        if loop.interrupted:
            self.bar.interrupt()  # the message that follows starts on its own line

    def on_epoch_end(self, loop, epoch, record, state):
        self.bar.close(record)


class StepScalars(Callback):
    """TensorBoard's steps/* scalars every `log_every` steps: the mean loss and accuracy of
    the steps since the last point (not of the epoch so far), and the learning rate."""

    def __init__(self, log_every: int, lr_at):
        self.log_every, self.lr_at, self.since = log_every, lr_at, EpochSums(0, 0, 0, 0)

    def on_epoch_begin(self, loop, epoch):
        self.since = EpochSums(0, 0, 0, 0)  # the state's sums start again with each epoch

    def on_calls_end(self, loop, begin, end, state):
        step = loop.step(end)
        if loop.scalars is None or not every(step, end - begin, self.log_every):
            return
        sums = EpochSums.of(state.metrics)
        window, self.since = sums.minus(self.since), sums
        values = {"steps/train_loss": window.mean_loss, "steps/train_accuracy": window.accuracy}
        loop.scalars.add(step, **values, **{"steps/learning_rate": self.lr_at(step)})


class PeriodicCheckpoint(Callback):
    """A checkpoint when a call crosses a multiple of `save_every` steps; the epoch's last
    step is left to EpochCheckpoint."""

    def __init__(self, save_every: int | None):
        self.save_every = save_every

    def on_calls_end(self, loop, begin, end, state):
        due = every(loop.step(end), end - begin, self.save_every)
        if loop.store is not None and due and end < loop.steps_per_epoch:
            loop.store.save(Position(loop.epoch, end), state, loop.epochs)


class StopOnRequest(Callback):
    """Polls `should_stop()` (the CLI's signal handler) after every call."""

    def __init__(self, should_stop):
        self.should_stop = should_stop

    def on_calls_end(self, loop, begin, end, state):
        if self.should_stop is not None and self.should_stop():
            loop.interrupt()


class Evaluation(Callback):
    """The epoch's loss and accuracy on a split (`name`_loss, `name`_accuracy in its record)."""

    def __init__(self, name: str, images, labels):
        self.name, self.images, self.labels = name, images, labels
        self.predictions = None

    def on_epoch_end(self, loop, epoch, record, state):
        ev = evaluate(loop.trainer.predictor, state.weights, self.images, self.labels)
        record.update({f"{self.name}_loss": ev["loss"], f"{self.name}_accuracy": ev["accuracy"]})
        self.predictions = ev["predictions"]


class ValidationPick(Evaluation):
    """Evaluates the validation split and keeps the best epoch's weights in memory (a tie goes
    to the later epoch, as orbax's best_step does); the run's model is that epoch's."""

    def __init__(self, images, labels):
        super().__init__("val", images, labels)
        self.best = None  # (accuracy, epoch, host weights)

    def on_epoch_end(self, loop, epoch, record, state):
        super().on_epoch_end(loop, epoch, record, state)
        if self.best is None or record["val_accuracy"] >= self.best[0]:
            self.best = (record["val_accuracy"], epoch + 1, jax.device_get(state.weights))


class StuckWarning(Callback):
    """One warning on stderr (and in metrics.json) when the run looks stuck after an epoch."""

    def __init__(self, prior: float, tested: Evaluation | None):
        self.prior, self.tested, self.warning = prior, tested, None

    def on_epoch_end(self, loop, epoch, record, state):
        predictions = None if self.tested is None else self.tested.predictions
        reason = stuck_reason(loop.epochs + [record], self.prior, predictions)
        if reason and self.warning is None:
            self.warning = f"warning: the run looks stuck after epoch {epoch + 1}: {reason}; "
            self.warning += stuck_advice(loop.config)
            print(self.warning, file=sys.stderr, flush=True)


class EpochScalars(Callback):
    """TensorBoard's epoch/* scalars: the record's figures, images/s and the learning rate."""

    def __init__(self, images: int, lr_at):
        self.images, self.lr_at = images, lr_at

    def on_epoch_end(self, loop, epoch, record, state):
        if loop.scalars is None:
            return
        step = loop.step(loop.steps_per_epoch)
        values = {f"epoch/{k}": v for k, v in record.items() if k != "seconds"}
        values["epoch/images_per_second"] = self.images / max(record["seconds"], 1e-9)
        loop.scalars.add(step, **values, **{"epoch/learning_rate": self.lr_at(step)})


class EpochCheckpoint(Callback):
    """A checkpoint at every epoch's end, scored by its validation accuracy if it has one."""

    def on_epoch_end(self, loop, epoch, record, state):
        if loop.store is not None:
            epochs = loop.epochs + [record]
            loop.store.save(Position(epoch + 1, 0), state, epochs, record.get("val_accuracy"))


class EarlyStopping(Callback):
    """Ends the run when `monitor` (a record's figure, higher is better) has not improved for
    `patience` epochs; the example in the README."""

    def __init__(self, monitor: str = "val_accuracy", patience: int = 3):
        self.monitor, self.patience, self.best, self.waited = monitor, patience, None, 0

    def on_epoch_end(self, loop, epoch, record, state):
        value = record[self.monitor]
        if self.best is None or value > self.best:
            self.best, self.waited = value, 0
            return
        self.waited += 1
        loop.stop_training = self.waited >= self.patience
