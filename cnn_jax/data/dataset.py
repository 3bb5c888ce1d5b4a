"""The decoded set every loader returns, and the error for data that cannot be used."""

import dataclasses

import numpy as np

from cnn_jax.errors import UserError


class DataError(UserError):
    """A data folder or file that cannot be used as given; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Decoded images and labels, plus the files that could not be read."""

    images: np.ndarray  # (N, size, size, 3) uint8, RGB, NHWC
    labels: np.ndarray  # (N,) int32 class ids
    paths: np.ndarray  # (N,) str, relative to the data folder
    skipped: tuple[tuple[str, str], ...]  # (path, reason) of each unreadable file

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def describe_error(e: Exception, path) -> str:
    """One line naming what went wrong with a file, without repeating its path."""
    reason = str(e).replace(f"'{path}'", "").replace(str(path), "").strip()
    return f"{type(e).__name__}: {reason}".splitlines()[0]
