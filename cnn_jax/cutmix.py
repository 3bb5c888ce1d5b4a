"""CutMix (`--aug-cutmix`; Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong
Classifiers with Localizable Features"): a rectangle of another training image pasted over an
image, whose target then holds both labels, each weighted by its share of the pixels.

A network that must name both signs of such an image cannot lean on one part of a sign (the
first digit of a speed limit, say) nor on its look as a whole. As in the paper, the pasted
area is uniform between nothing and the whole image (the rectangle's side the square root of
it, its centre anywhere, clipped at the edges); here each image draws whether it gets one, the
paper's chance per batch made per image, so that a batch of 16 holds a steady mix.
"""

import jax
import jax.numpy as jnp

from cnn_jax import augment

CUTMIX_TAG = 0x6375746D  # "cutm": fold_in's tag, far from the augmentation's split indices


def cutmix(key, images, weights, chance: float):
    """NHWC `images`, each with probability `chance` given a rectangle of another image of the
    batch (a real one: `weights` > 0 marks those, not the padding of an epoch's last batch).

    Returns the images, each one's partner (its index in the batch) and each one's own share
    of the pixels (1 where nothing was pasted): what `mixed_targets` takes."""
    n, h, w = images.shape[:3]
    k_do, k_partner, k_area, k_row, k_col = jax.random.split(key, 5)
    partner = jax.random.permutation(k_partner, n)
    do = (jax.random.uniform(k_do, (n,)) < chance) & (weights[partner] > 0)
    side = jnp.sqrt(jax.random.uniform(k_area, (n,)))  # a fraction of each side
    size = jnp.array([h, w])
    half = side[:, None] * size / 2
    centre = jnp.stack([jax.random.uniform(k, (n,)) for k in (k_row, k_col)], 1) * size
    box = jax.vmap(lambda c, r: augment.rectangle(c, r, h, w))(centre, half)
    box = box & do[:, None, None]
    images = jnp.where(box[..., None], images[partner], images)
    share = 1.0 - jnp.mean(box, axis=(1, 2))
    return images, partner, share


def mixed_targets(targets, partner, share):
    """Each image's target (probabilities per class) mixed with its partner's by area."""
    return share[:, None] * targets + (1.0 - share[:, None]) * targets[partner]
