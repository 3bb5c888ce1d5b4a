"""A spatial transformer (Jaderberg et al., 2015) for Model 3's input: `--stn`.

A small localisation network looks at the image and predicts an affine map; the image is
resampled through it (augment.warp, the augmentation's bilinear warp) before the classifier
sees it, so the network can learn to centre, straighten and scale each sign. Its last layer
starts at zero weights and the identity's bias, so training starts from the plain Model 3.
The localisation network is that of Moodstocks' gtsrb.torch (99.33% with 20,000 GTSRB
training images): pool, conv 5x5 (20), pool, conv 5x5 (20), dense 50, dense 6.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from cnn_jax import ops
from cnn_jax.augment import warp

FILTERS = 20
HIDDEN = 50
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # (a, b, tx, c, d, ty), row-major 2x3


def _side(image_size: int) -> int:
    return (image_size // 2 - 4) // 2 - 4


class SpatialTransformer(nnx.Module):
    def __init__(self, image_size: int, dtype, rngs: nnx.Rngs):
        glorot, zeros = nnx.initializers.glorot_uniform(), nnx.initializers.zeros_init()
        conv = dict(kernel_size=(5, 5), padding="VALID", kernel_init=glorot, dtype=dtype)
        self.conv1 = nnx.Conv(3, FILTERS, **conv, rngs=rngs)
        self.conv2 = nnx.Conv(FILTERS, FILTERS, **conv, rngs=rngs)
        side = _side(image_size)
        self.dense1 = nnx.Linear(side * side * FILTERS, HIDDEN, kernel_init=glorot, dtype=dtype,
                                 rngs=rngs)  # fmt: skip
        self.theta = nnx.Linear(HIDDEN, 6, kernel_init=zeros,
                                bias_init=_identity, rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC images, each resampled through the affine map predicted for it."""
        h = nnx.relu(self.conv1(ops.max_pool_2x2(x)))
        h = nnx.relu(self.conv2(ops.max_pool_2x2(h)))
        h = nnx.relu(self.dense1(h.reshape(h.shape[0], -1)))
        theta = self.theta(h).reshape(-1, 2, 3)
        return jax.vmap(warp)(x, jax.vmap(lambda t: _pixel_pull(t, x.shape[1]))(theta))


def _identity(key, shape, dtype=jnp.float32) -> jax.Array:
    # A new array each time: a shared one would be the parameter, and training donates it.
    return jnp.array(IDENTITY, dtype).reshape(shape)


def _pixel_pull(theta: jax.Array, side: int) -> jax.Array:
    """The map in pixel coordinates for a map in coordinates of -1..1 about the centre (the
    convention of the paper, where the identity and a shift by the whole image read alike
    at any size)."""
    c = (side - 1) / 2
    linear, shift = theta[:, :2], theta[:, 2]
    return jnp.concatenate([linear, (c - linear @ jnp.full(2, c) + c * shift)[:, None]], axis=1)
