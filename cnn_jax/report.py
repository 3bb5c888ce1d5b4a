"""Progress bars and result lines in the words of Keras' `fit` and `evaluate`."""

import sys
import time

import numpy as np


class Progress:
    """A per-epoch bar: steps, loss, accuracy and images/s; one plain line when not a terminal."""

    def __init__(self, epoch: int, epochs: int, steps: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        if enabled:
            print(f"Epoch {epoch + 1}/{epochs}", file=self.stream, flush=True)

    def update(self, step: int, metrics) -> None:
        """Redraws at most ten times a second; reading the metrics waits for the device."""
        now = time.perf_counter()
        if not self.live or (now - self.last_draw < 0.1 and step < self.steps):
            return
        self.last_draw = now
        rows = np.asarray(metrics).reshape(-1, 3)  # an ensemble has a row per member
        loss_sum, correct, count = rows.sum(0)
        rate = rows[0, 2] / max(now - self.t0, 1e-9)
        self._draw(step, loss_sum / count, correct / count, f"{rate:,.0f} img/s", "\r")

    def interrupt(self) -> None:
        """Ends a bar that was cut short, so the next message starts on its own line."""
        if self.live:
            print(file=self.stream, flush=True)

    def close(self, record: dict) -> None:
        if not self.enabled:
            return
        seconds = record["seconds"]
        extra = ""
        if "val_accuracy" in record:
            extra += f" - val_accuracy: {record['val_accuracy']:.4f}"
        if "test_accuracy" in record:
            loss, acc = record["test_loss"], record["test_accuracy"]
            extra += f" - test_loss: {loss:.4f} - test_accuracy: {acc:.4f}"
        ms = seconds * 1e3 / max(self.steps, 1)
        self._draw(
            self.steps,
            record["train_loss"],
            record["train_accuracy"],
            f"{seconds:.0f}s {ms:.0f}ms/step{extra}",
            "\r" if self.live else "",
        )
        print(file=self.stream, flush=True)

    def _draw(self, step, loss, accuracy, tail, prefix) -> None:
        width = 30
        done = width * step // max(self.steps, 1)
        bar = "=" * max(done - 1, 0) + (">" if done < width else "=") + "." * (width - done)
        line = f"{step}/{self.steps} [{bar}] - loss: {loss:.4f} - accuracy: {accuracy:.4f} - {tail}"
        clear = "\033[K" if self.live else ""  # erase what a longer previous line left
        print(prefix + line + clear, end="", file=self.stream, flush=True)


def test_line(loss: float, accuracy: float) -> str:
    """The tutorial's closing line."""
    return f"test: loss {loss:.4f} - accuracy {accuracy:.4f}"
