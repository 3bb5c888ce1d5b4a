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
    standardises. 'local' first normalises each pixel's contrast to its neighbourhood's (see
    `_local_contrast`), then standardises.
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
    if pixels == "local":
        return _standardise(_local_contrast(x))
    if pixels in ("standard", "equalize", "grey"):
        return _standardise(x / 255.0)
    raise UserError(f"unknown pixel scaling {pixels!r}: choose one of {', '.join(PIXELS)}")


def _standardise(x):
    axes = (-3, -2, -1)
    # The floor keeps a flat image (one colour) from being blown up to noise.
    spread = x.std(axis=axes, keepdims=True).clip(min=1.0 / 64)
    return (x - x.mean(axis=axes, keepdims=True)) / spread


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


def _local_contrast(x):
    """Local contrast normalisation (Jarrett et al. 2009, as Sermanet and LeCun 2011 used it on
    GTSRB) of float 0..255 NHWC images, NumPy or JAX: each channel minus its Gaussian-weighted
    neighbourhood mean, divided by the neighbourhood's spread over all channels (floored at
    the image's mean spread, so flat regions are not blown up to noise). A dark photo and the
    same photo lit are the same input, and strokes in a shaded part of a sign are lifted
    toward those in its lit part (up to that floor). The Gaussian (sigma a sixteenth of the
    side) is a product with a band matrix along each axis: the same arithmetic in NumPy and JAX.
    """
    xp = np if isinstance(x, np.ndarray) else _jnp()
    blur = lambda v: _along(_along(v, -3, xp), -2, xp)  # noqa: E731
    unit = x / 255.0
    centred = unit - blur(unit)
    spread = xp.sqrt(blur((centred**2).mean(axis=-1, keepdims=True)))
    floor = spread.mean(axis=(-3, -2, -1), keepdims=True).clip(min=1.0 / 64)
    return centred / xp.maximum(spread, floor)


def _along(x, axis: int, xp):
    """x (..., h, w, c) blurred along its rows (axis -3) or columns (-2): per image, a
    (side x side) band times a (side x rest) matrix. TFLite's converter takes that batch of
    rank 3, not a rank-4 product (it refused an einsum over NHWC)."""
    moved = xp.moveaxis(x, axis, -3)
    side = moved.shape[-3]
    flat = moved.reshape(-1, side, moved.shape[-2] * moved.shape[-1])
    band = xp.broadcast_to(_gaussian_band(side), (flat.shape[0], side, side))
    return xp.moveaxis(xp.matmul(band, flat).reshape(moved.shape), -3, axis)


def _gaussian_band(side: int) -> np.ndarray:
    """(side, side) rows of Gaussian weights, each summing to 1 over the pixels inside the
    image, so the borders average what is there instead of zeros."""
    sigma = max(side / 16, 1.0)
    offsets = np.arange(side)[:, None] - np.arange(side)[None, :]
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _jnp():
    import jax.numpy as jnp  # only JAX arrays get here; the decode workers never import JAX

    return jnp
