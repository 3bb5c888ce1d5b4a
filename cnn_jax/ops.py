"""The layers' arithmetic in the forms XLA runs fastest on each backend.

`conv3x3` is Keras' Conv2D(3x3, "valid", stride 1) written as one matrix product over the nine
shifted views of the input (im2col). XLA:CPU runs that, and its gradient, through its tuned matrix
kernels, where its direct convolution is slow; on GPU cuDNN's convolution is the fast one. The
values are those of `lax.conv_general_dilated` up to float rounding (tests/test_ops.py).
"""

import jax
import jax.numpy as jnp
from jax import lax

CONVS = ("auto", "lax", "matmul")


def conv3x3_matmul(inputs, kernel, window_strides=None, padding=None, **unused):
    """A drop-in for `lax.conv_general_dilated` for NHWC/HWIO, stride 1, VALID convolutions."""
    if tuple(window_strides or (1, 1)) != (1, 1) or padding not in ("VALID", None):
        raise ValueError("conv3x3_matmul handles stride 1, VALID convolutions only")
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = inputs.shape
    ho, wo = h - kh + 1, w - kw + 1
    # Channel order (dy, dx, cin) matches the HWIO kernel's flattening.
    cols = jnp.concatenate(
        [inputs[:, dy : dy + ho, dx : dx + wo, :] for dy in range(kh) for dx in range(kw)], axis=-1
    )
    out = cols.reshape(b * ho * wo, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)
    return out.reshape(b, ho, wo, cout)


def resolve_conv(conv: str):
    """The convolution function for a `--conv` choice; 'auto' picks by the default backend."""
    if conv not in CONVS:
        raise ValueError(f"unknown convolution {conv!r}: choose one of {', '.join(CONVS)}")
    if conv == "auto":
        conv = "matmul" if jax.default_backend() == "cpu" else "lax"
    return conv3x3_matmul if conv == "matmul" else lax.conv_general_dilated


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """Keras' MaxPooling2D((2, 2)): stride = pool size, "valid" (an odd last row is dropped).

    Written as reshape + max rather than `nnx.max_pool`: on CPU the gradient of `reduce_window`
    lowers to select-and-scatter, which doubled the whole training step. Values and gradients
    equal `nnx.max_pool`'s where the window's maximum is unique (tests/test_ops.py).
    """
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
