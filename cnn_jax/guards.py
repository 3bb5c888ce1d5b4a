"""Guard rails that explain a bad run: a loss that is no longer a number, and a stuck run."""

import numpy as np

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
