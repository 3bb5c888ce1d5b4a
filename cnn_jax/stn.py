"""A spatial transformer (Jaderberg et al., 2015) for Model 3's input: `--stn`.

A small localisation network looks at the image and predicts an affine map; the image is
resampled through it (augment.warp, the augmentation's bilinear warp) before the classifier
sees it, so the network can learn to centre, straighten and scale each sign. Its last layer
starts at zero weights and the identity's bias, so training starts from the plain Model 3.
The localisation network is the default of Moodstocks' gtsrb.torch (`--locnet 30,60,30`,
networks.lua; 99.33% with 20,000 GTSRB training images): a 2x2 pool, then two blocks of
[conv 5x5 "same", ReLU, 2x2 pool] of 30 and 60 filters, dense 30 with ReLU, dense 6.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from cnn_jax import ops
from cnn_jax.augment import about_centre, warp

FILTERS = (30, 60)
HIDDEN = 30
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # (a, b, tx, c, d, ty), row-major 2x3


class SpatialTransformer(nnx.Module):
    def __init__(self, image_size: int, dtype, rngs: nnx.Rngs):
        glorot, zeros = nnx.initializers.glorot_uniform(), nnx.initializers.zeros_init()
        conv = dict(kernel_size=(5, 5), padding="SAME", kernel_init=glorot, dtype=dtype)
        self.conv1 = nnx.Conv(3, FILTERS[0], **conv, rngs=rngs)
        self.conv2 = nnx.Conv(FILTERS[0], FILTERS[1], **conv, rngs=rngs)
        side = image_size // 8  # three 2x2 pools
        self.dense1 = nnx.Linear(side * side * FILTERS[1], HIDDEN, kernel_init=glorot, dtype=dtype,
                                 rngs=rngs)  # fmt: skip
        self.theta = nnx.Linear(HIDDEN, 6, kernel_init=zeros,
                                bias_init=_identity, rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC images, each resampled through the affine map predicted for it."""
        h = ops.max_pool_2x2(x)
        h = ops.max_pool_2x2(nnx.relu(self.conv1(h)))
        h = ops.max_pool_2x2(nnx.relu(self.conv2(h)))
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
    return about_centre(theta[:, :2], theta[:, 2] * ((side - 1) / 2), side)
