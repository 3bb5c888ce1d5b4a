"""Pixel scaling: uint8 images to the network's float input, for NumPy and JAX arrays alike
(training scales on the device, inside the compiled step)."""

import numpy as np

from cnn_jax.config import PIXELS
from cnn_jax.errors import UserError


def scale_pixels(images, pixels: str):
    """uint8 (or 0..255 float) images -> float32, NumPy or JAX arrays alike.

    'unit' divides by 255, 'raw' keeps 0..255 as the tutorial does, 'standard' gives each image
    zero mean and unit spread over all its pixels (TensorFlow's per_image_standardization):
    dark and washed-out photos, common in GTSRB, reach the network at one contrast.
    'equalize' first equalises each image's histogram (see `_equalize`), then standardises.
    'grey' first puts each pixel's luminance in all three channels (see `_grey`), then
    standardises.
    """
    x = images.astype("float32")
    if pixels == "unit":
        return x / 255.0
    if pixels == "raw":
        return x
    if pixels == "equalize":
        x = _equalize(x)
    if pixels == "grey":
        x = _grey(x)
    if pixels in ("standard", "equalize", "grey"):
        x = x / 255.0
        axes = (-3, -2, -1)
        # The floor keeps a flat image (one colour) from being blown up to noise.
        spread = x.std(axis=axes, keepdims=True).clip(min=1.0 / 64)
        return (x - x.mean(axis=axes, keepdims=True)) / spread
    raise UserError(f"unknown pixel scaling {pixels!r}: choose one of {', '.join(PIXELS)}")


def _equalize(x):
    """Histogram equalisation of float 0..255 NHWC images (NumPy or JAX), one curve per image.

    The tone curve is the cumulative histogram of the image's luminance (256 bins), applied to
    all three channels alike, so colours keep their order and roughly their hue; it spreads a
    dark sign in front of a bright sky over the whole range, which a linear rescaling cannot.
    A bincount over all images at once: sorting each image and searching it took 14 ms per
    batch of 64 on CPU, this about 1 ms. The luminance is integer arithmetic, rounded: in
    float32 a grey pixel's weighted sum lands a rounding error either side of its level,
    which one CPU's summation order truncated to the level below and another's did not.
    """
    xp = np if isinstance(x, np.ndarray) else _jnp()
    weights = np.array([299, 587, 114], np.int32)[: x.shape[-1]]
    flat = x.reshape(-1, x.shape[-3] * x.shape[-2], x.shape[-1])
    n, pixels = flat.shape[:2]
    offsets = 256 * xp.arange(n)[:, None]
    level = lambda v: xp.clip(xp.round(v), 0, 255).astype(np.int32)  # noqa: E731
    total = int(weights.sum())
    luminance = (level(flat) @ weights + total // 2) // total + offsets
    size = dict(minlength=256 * n) if xp is np else dict(length=256 * n)  # jit needs a length
    counts = xp.bincount(luminance.reshape(-1), **size)
    curve = xp.cumsum(counts.reshape(n, 256), axis=1) * np.float32(255.0 / pixels)
    rows = xp.arange(n)[:, None, None]
    return curve[rows, level(flat)].astype(np.float32).reshape(x.shape)


def _grey(x):
    """Each pixel's luminance (ITU-R BT.601 weights) in all three channels, so the network's
    input keeps its shape and an exported graph still takes RGB."""
    xp = np if isinstance(x, np.ndarray) else _jnp()
    weights = np.array([0.299, 0.587, 0.114], np.float32)[: x.shape[-1]]
    luminance = (x * weights).sum(axis=-1, keepdims=True)
    return xp.broadcast_to(luminance, x.shape)


def _jnp():
    import jax.numpy as jnp  # only JAX arrays get here; the decode workers never import JAX

    return jnp
