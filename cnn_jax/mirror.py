"""Mirror images of GTSRB's signs (`--aug-flip`): a sign whose mirror image is a sign.

Some of GTSRB's signs look the same mirrored left-right (yield, no entry), up-down (the 30 and
80 km/h limits) or turned half round (end of all limits), and four pairs mirror into each other
(a curve to the left is one to the right): Staravoitau (2017, "Traffic signs classification
with a convolutional network") extended the training set by these mirrors. Here each training
image of such a class is mirrored with a chance, inside the step, by one of its class's mirrors
drawn evenly, and takes the mirror's class. Every other sign stays as it is: a left turn
mirrored is a right turn, but a 60 km/h sign mirrored is no sign at all.
"""

import jax
import jax.numpy as jnp
import numpy as np

GTSRB_CLASSES = 43
_SAME = lambda *ids: {c: c for c in ids}  # noqa: E731
_PAIRS = {19: 20, 20: 19, 33: 34, 34: 33, 36: 37, 37: 36, 38: 39, 39: 38}
# Class id -> its mirror's class: left-right, up-down, and both (a half turn).
MIRRORS = (
    {**_SAME(11, 12, 13, 15, 17, 18, 22, 26, 30, 35), **_PAIRS},
    _SAME(1, 5, 12, 15, 17),
    _SAME(12, 15, 17, 32, 40),
)
MIRROR_TAG = 0x6D697272  # "mirr": fold_in's tag, far from the augmentation's split indices


def _table() -> np.ndarray:
    """(3, 43): the class each mirror makes of a class, -1 where it makes none."""
    table = np.full((3, GTSRB_CLASSES), -1, np.int32)
    for row, mirror in zip(table, MIRRORS):
        row[list(mirror)] = list(mirror.values())
    return table


def mirror(key, images, labels, chance: float, targets=None):
    """NHWC `images` of GTSRB class `labels`, each mirrored with probability `chance` when its
    class has a mirror; returns the images, their labels and `targets` (a teacher's
    probabilities over the classes, which follow the mirror: a curve left's probability becomes
    the curve right's)."""
    table = jnp.asarray(_table())
    k_do, k_which = jax.random.split(key)
    into = table[:, labels].T  # (batch, 3): each mirror's class, -1 where none
    scores = jnp.where(into >= 0, jax.random.uniform(k_which, into.shape), -1.0)
    which = jnp.argmax(scores, axis=1)  # one of the class's mirrors, evenly
    do = (jnp.max(scores, axis=1) >= 0) & (jax.random.uniform(k_do, labels.shape) < chance)
    across = (do & (which != 1)).reshape(-1, 1, 1, 1)  # left-right, or a half turn
    upside = (do & (which != 0)).reshape(-1, 1, 1, 1)  # up-down, or a half turn
    images = jnp.where(across, images[:, :, ::-1], images)
    images = jnp.where(upside, images[:, ::-1], images)
    labels = jnp.where(do, jnp.take_along_axis(into, which[:, None], 1)[:, 0], labels)
    if targets is not None:  # mirrors are their own inverses: class j takes its mirror's share
        swap = jnp.where(table < 0, jnp.arange(GTSRB_CLASSES), table)[which]  # (batch, 43)
        targets = jnp.where(do[:, None], jnp.take_along_axis(targets, swap, 1), targets)
    return images, labels, targets
