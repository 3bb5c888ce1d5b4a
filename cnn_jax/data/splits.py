"""Train, validation and test splits: the tutorial's random one, and whole GTSRB tracks."""

import os
import re

import numpy as np

from cnn_jax.config import SPLITS, Config
from cnn_jax.data.dataset import DataError, Dataset
from cnn_jax.errors import UserError

_TRACK_NAME = re.compile(r"^(\d+)_(\d+)\.[^.]+$")


def track_groups(paths: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A group id per image: GTSRB's TTTTT_IIIII names share a group per (class, track).

    Files not named that way form a group of their own.
    """
    keys = [track_name(p, y) or f"file/{i}" for i, (p, y) in enumerate(zip(paths, labels))]
    _, groups = np.unique(np.asarray(keys), return_inverse=True)
    return groups


def track_name(path, label) -> str | None:
    """'class/track' for a GTSRB TTTTT_IIIII file name, None for any other name."""
    m = _TRACK_NAME.match(os.path.basename(str(path)))
    return f"{label}/{m.group(1)}" if m else None


def split_indices(
    labels: np.ndarray,
    test_size: float,
    seed: int,
    how: str = "random",
    paths: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays.

    'random' is the tutorial's `train_test_split`: a seeded shuffle, ceil(test_size * N) to test.
    'track' keeps each GTSRB track (30 photos of one physical sign) on one side, taking about
    `test_size` of every class's tracks, so near-duplicates cannot leak across the split.
    """
    if not 0.0 < test_size < 1.0:
        raise UserError(f"test size must be between 0 and 1, got {test_size}")
    n = len(labels)
    rng = np.random.default_rng(seed)
    if how == "random":
        order = rng.permutation(n)
        n_test = int(np.ceil(test_size * n))
        if n_test >= n:
            raise DataError(f"{n} images are too few to hold out {test_size:g} of them")
        return np.sort(order[n_test:]), np.sort(order[:n_test])
    if how != "track":
        raise UserError(f"unknown split {how!r}: choose one of {', '.join(SPLITS)}")
    if paths is None:
        raise UserError("a track split needs the image paths")
    groups = track_groups(paths, labels)
    test = np.zeros(n, bool)
    for c in np.unique(labels):
        class_groups = np.unique(groups[labels == c])
        rng.shuffle(class_groups)
        k = int(round(test_size * len(class_groups)))
        k = min(max(k, 1), len(class_groups) - 1) if len(class_groups) > 1 else 0
        test |= np.isin(groups, class_groups[:k]) & (labels == c)
    if not test.any() or test.all():
        raise DataError("the track split put every image on one side: too few tracks")
    return np.flatnonzero(~test), np.flatnonzero(test)


def split_run(config: Config, dataset: Dataset):
    """(train, validation, test) indices: the test split, then `val_size` of the training side
    (whole tracks with --split track) for validation; the validation set is empty without it."""
    train, test = split_indices(
        dataset.labels, config.test_size, config.seed, config.split, dataset.paths
    )
    if not config.val_size:
        return train, train[:0], test
    # Its own random stream: the same seed would shuffle the training side as it did the set.
    fit, val = split_indices(
        dataset.labels[train], config.val_size, [config.seed, 1], config.split,
        dataset.paths[train],
    )  # fmt: skip
    return train[fit], train[val], test
