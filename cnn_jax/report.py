"""What a run shows while it trains: the progress bar, the epoch lines, TensorBoard scalars."""

import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np


class EpochSums(NamedTuple):
    """A training state's `metrics` by name: the epoch's sums so far (an ensemble's over all
    its members)."""

    loss: float  # the images' losses, summed
    correct: float  # images predicted right
    count: float  # images seen, times the members
    images: float  # images seen by one network

    @classmethod
    def of(cls, metrics) -> "EpochSums":
        """From float32[3] (sum of loss, correct, images), or [members, 3] for an ensemble."""
        rows = np.asarray(metrics, np.float64).reshape(-1, 3)
        loss, correct, count = rows.sum(0)
        return cls(float(loss), float(correct), float(count), float(rows[0, 2]))

    def minus(self, earlier: "EpochSums") -> "EpochSums":
        """The sums of the steps since `earlier` (of the same epoch)."""
        return EpochSums(*(a - b for a, b in zip(self, earlier)))

    @property
    def mean_loss(self) -> float:
        return self.loss / self.count if self.count else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")


class Progress:
    """A tqdm bar per epoch on a terminal (steps, loss, accuracy, images/s); when the output is
    piped, only one plain line per epoch."""

    def __init__(self, epoch: int, epochs: int, steps: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stdout
        self.enabled, self.steps = enabled, steps
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"Epoch {epoch + 1}/{epochs}", unit="step",
                            file=self.stream, dynamic_ncols=True, mininterval=0.1)  # fmt: skip
        elif enabled:
            print(f"Epoch {epoch + 1}/{epochs}", file=self.stream, flush=True)

    def update(self, step: int, metrics) -> None:
        """Reading the metrics waits for the device; tqdm redraws at most ten times a second."""
        if self.bar is None:
            return
        sums = EpochSums.of(metrics)
        loss, accuracy = sums.mean_loss, sums.accuracy
        rate = sums.images / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"loss {loss:.4f} - accuracy {accuracy:.4f} - {rate:,.0f} img/s",
                                 refresh=False)  # fmt: skip
        self.bar.update(step - self.bar.n)

    def interrupt(self) -> None:
        """Ends a bar that was cut short, so the next message starts on its own line."""
        if self.bar is not None:
            self.bar.close()

    def close(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.close()
        if not self.enabled:
            return
        ms = record["seconds"] * 1e3 / max(self.steps, 1)
        loss, accuracy = record["train_loss"], record["train_accuracy"]
        line = f"{self.steps}/{self.steps} - loss: {loss:.4f} - accuracy: {accuracy:.4f}"
        line += f" - {record['seconds']:.0f}s {ms:.0f}ms/step"
        for key in ("val_accuracy", "test_loss", "test_accuracy"):
            if key in record:
                line += f" - {key}: {record[key]:.4f}"
        print(line, file=self.stream, flush=True)


class Scalars:
    """TensorBoard event files in a run folder (`tensorboard --logdir runs` shows them), written
    by tensorboardX: no TensorFlow needed."""

    def __init__(self, logdir: Path | str):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(logdir))

    def add(self, step: int, **values) -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        self.writer.close()


def strict_json(value) -> str:
    """JSON every parser reads: a NaN or infinity (which Python's json writes as the non-JSON
    `NaN`) becomes null, and the object that held it gets "non_finite": true."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            out = {k: clean(x) for k, x in v.items()}
            if any(isinstance(x, float) and not math.isfinite(x) for x in v.values()):
                out["non_finite"] = True
            return out
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), indent=2, allow_nan=False)


def test_line(loss: float, accuracy: float) -> str:
    """The tutorial's closing line."""
    return f"test: loss {loss:.4f} - accuracy {accuracy:.4f}"
