"""Where a network fails: the classes and the GTSRB tracks (one physical sign each) it gets wrong
most often, what it takes them for, and which training tracks it finds them like. The report
lists the first two (`scripts/nearest_tracks.py` the third); they are the place to look before
trying the next idea."""

from typing import NamedTuple

import numpy as np

from cnn_jax.data.splits import track_name


class Failing(NamedTuple):
    """A class or a track, its images' accuracy and the classes its mistakes went to."""

    name: str  # the class id, or the track's class/track
    label: int  # the true class
    images: int
    accuracy: float
    taken_for: list[tuple[int, int]]  # (predicted class, images), most frequent first


def _failing(name, label, predictions) -> Failing:
    wrong = predictions[predictions != label]
    classes, counts = np.unique(wrong, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    taken_for = [(int(classes[i]), int(counts[i])) for i in order]
    return Failing(name, int(label), len(predictions), float(np.mean(predictions == label)),
                   taken_for)  # fmt: skip


def _worst(items: list[Failing], count: int) -> list[Failing]:
    """The `count` lowest accuracies that are below 1, the larger groups first on ties."""
    items = [f for f in items if f.accuracy < 1]
    return sorted(items, key=lambda f: (f.accuracy, -f.images, f.name))[:count]


def worst_classes(labels, predictions, count: int = 10) -> list[Failing]:
    items = [_failing(str(c), c, predictions[labels == c]) for c in np.unique(labels)]
    return _worst(items, count)


def worst_tracks(paths, labels, predictions, count: int = 10) -> list[Failing]:
    """Tracks by GTSRB's TTTTT_IIIII file names; files not named that way are left out."""
    names = np.asarray([track_name(p, y) for p, y in zip(paths, labels)], dtype=object)
    items = []
    for name in sorted({n for n in names if n is not None}):
        rows = names == name
        items.append(_failing(name, labels[rows][0], predictions[rows]))
    return _worst(items, count)


def nearest_tracks(features, train_features, train_names, neighbours: int = 10) -> np.ndarray:
    """(images, neighbours): the track names of each image's nearest training images, nearest
    first, by the cosine of their features (what the network's last layer reads). A track
    every network misreads may be near another class's track photographed alike."""
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # noqa: E731
    similarity = (
        unit(np.asarray(features, np.float64)) @ unit(np.asarray(train_features, np.float64)).T
    )
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :neighbours]
    return np.asarray(train_names, dtype=object)[order]
