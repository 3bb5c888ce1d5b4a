"""The function every export format holds: uint8 RGB NHWC images in, class probabilities out,
the run's pixel scaling inside, the weights as constants.

`portable=True` builds it from operations every converter takes: ensemble members one after
the other (a vmapped ensemble became a STABLEHLO_CASE that XNNPACK refused) and histogram
equalisation without a scatter (TFLite has no STABLEHLO_SCATTER kernel).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnn_jax.data import scale_pixels

# ITU-R 601 luma weights, as pixels._equalize uses them (integer arithmetic, rounded)
_LUMA = (299, 587, 114)


def serving_function(predictor, weights, portable: bool):
    """uint8 images (batch, size, size, 3) -> float32 probabilities (batch, classes); an
    ensemble's are its members' mean, as the predictor's."""
    weights = jax.device_get(weights)  # host arrays: constants of the exported graph

    def probabilities(images):
        if portable and predictor.pixels == "equalize":
            # 'equalize' is equalisation, then the 'standard' scaling of the result
            x = scale_pixels(equalize(images.astype(jnp.float32)), "standard")
        else:
            x = scale_pixels(images, predictor.pixels)
        one = lambda w: jax.nn.softmax(nnx.merge(predictor.graphdef, w)(x).astype(jnp.float32))  # noqa: E731
        if not predictor.members:
            return one(weights)
        if not portable:
            return jax.vmap(one)(weights).mean(0)
        members = [
            one(jax.tree.map(lambda a, m=m: a[m], weights)) for m in range(predictor.members)
        ]
        return jnp.stack(members).mean(0)

    return probabilities


def equalize(x):
    """pixels._equalize without a scatter or a gather: the same counts, the same curve, the
    same values (every sum is of integers, or of one non-zero term, so exact in float32).

    Costs (pixels x 3 x 256) comparisons per image: for the small static batches of TFLite
    and ONNX, not for training."""
    n, h, w, c = x.shape
    level = jnp.clip(jnp.round(x), 0, 255).astype(jnp.int32).reshape(n, h * w, c)
    total = sum(_LUMA[:c])
    weighted = sum(level[..., i] * _LUMA[i] for i in range(c))
    luminance = (weighted + total // 2) // total  # (n, pixels)
    levels = jnp.arange(256, dtype=jnp.int32)
    counts = (luminance[..., None] == levels).astype(jnp.float32).sum(1)  # (n, 256)
    # The cumulative sum as a product with a triangle of ones: a plain matmul everywhere.
    below = jnp.asarray(np.triu(np.ones((256, 256), np.float32)))
    curve = (counts @ below) * np.float32(255.0 / (h * w))
    onehot = (level[..., None] == levels).astype(jnp.float32)  # (n, pixels, c, 256)
    return jnp.einsum("npcl,nl->npc", onehot, curve).reshape(n, h, w, c)
