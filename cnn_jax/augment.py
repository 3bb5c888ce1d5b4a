"""Random geometric and photometric changes of training images, on the device inside the step.

Each image gets its own small random affine map (rotation, scaling, shear, translation),
brightness and contrast change and, when asked for, a change of aspect, an elastic
distortion, a change of stroke weight, a gamma change, a colour cast, blur, pixel noise and an
erased rectangle, drawn from a key the step derives from the run's seed and the global step, so
a resumed run draws the same changes.
No mirror flips here: a left-turn sign mirrored is a right-turn sign, another class
(`--aug-flip`, mirror.py, mirrors the signs whose mirror image is a sign, with their labels).

The resampling is `jax.scipy.ndimage.map_coordinates` (bilinear, edges repeated), one channel
at a time: dm-pix's `affine_transform` gives the same values (to 3e-5 of 255) but interpolates
across channels as a third axis, and took 60 ms per batch of 64 on CPU against 2.8 ms.
"""

import math

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

from cnn_jax.config import Strengths  # the largest change of each kind


def _pull_matrix(key: jax.Array, side: int, s: Strengths) -> jax.Array:
    """A 2x3 map from output (row, col, 1) to input coordinates, about the centre.

    The draws are symmetric about the identity, so drawing the pull (inverse) map directly
    gives the same distribution of changes as drawing the push map and inverting it. The
    aspect draws from a key of its own, so the other five stay as they were without it.
    """
    k = jax.random.split(key, 5)
    u = lambda i, amp: jax.random.uniform(k[i], (), minval=-amp, maxval=amp)  # noqa: E731
    angle = u(0, math.radians(s.rotate))
    zoom = 1.0 + u(1, s.scale)
    shear = u(2, s.shear)
    shift = jnp.stack([u(3, s.shift), u(4, s.shift)]) * side
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    linear = jnp.array([[cos, -sin], [sin, cos]]) @ jnp.array([[1.0, shear], [0.0, 1.0]]) / zoom
    if s.aspect:
        wide = 1.0 + jax.random.uniform(
            jax.random.fold_in(key, ASPECT_TAG), (), minval=-s.aspect, maxval=s.aspect
        )
        linear = linear @ jnp.diag(jnp.array([1.0, wide]))  # columns only: the width
    return about_centre(linear, shift, side)


def about_centre(linear: jax.Array, shift: jax.Array, side: int) -> jax.Array:
    """The 2x3 pull map that applies the 2x2 `linear` about the image's centre, then moves by
    `shift` pixels: what `warp` takes."""
    centre = jnp.full(2, (side - 1) / 2)
    offset = centre - linear @ centre + shift
    return jnp.concatenate([linear, offset[:, None]], axis=1)


def warp(image: jax.Array, pull: jax.Array, bend: jax.Array | None = None) -> jax.Array:
    """An HWC image resampled where the 2x3 `pull` sends each output (row, col, 1): bilinear,
    edges repeated; differentiable in `pull` (the spatial transformer learns through it).
    `bend`, an (h, w, 2) field, first moves each output pixel by its own (rows, cols)."""
    h, w, channels = image.shape
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                              indexing="ij")  # fmt: skip
    if bend is not None:
        rows, cols = rows + bend[..., 0], cols + bend[..., 1]
    coords = [pull[i, 0] * rows + pull[i, 1] * cols + pull[i, 2] for i in range(2)]
    return jnp.stack(
        [ndimage.map_coordinates(image[..., c], coords, order=1, mode="nearest")
         for c in range(channels)], axis=-1,
    )  # fmt: skip


def _one(key: jax.Array, image: jax.Array, s: Strengths) -> jax.Array:
    k_geom, k_bright, k_contrast = jax.random.split(key, 3)
    side = image.shape[0]
    # The elastic field bends the pixels before the affine map moves them: one resampling.
    bend = _bend(jax.random.fold_in(key, ELASTIC_TAG), side, s.elastic) if s.elastic else None
    image = warp(image, _pull_matrix(k_geom, side, s), bend)
    # Gamma, blur, noise and erasing draw from keys of their own (fold_in with a tag), so that
    # the split(key, 3) draws stay as they were for runs saved before them; at strength 0 they
    # are left out of the program. The tags are far from 0..2: fold_in(key, i) can equal
    # split(key, 3)[i].
    if s.stroke:
        image = _stroke(jax.random.fold_in(key, STROKE_TAG), image, s.stroke)
    if s.gamma:
        image = _gamma(jax.random.fold_in(key, GAMMA_TAG), image, s.gamma)
    k_blur, k_spread, k_pixels = jax.random.split(jax.random.fold_in(key, EXTRA_DRAWS_TAG), 3)
    if s.blur:
        image = _blur(image, jax.random.uniform(k_blur, (), maxval=s.blur))
    if s.colour:
        image = _colour_cast(jax.random.fold_in(key, COLOUR_TAG), image, s.colour)
    mean = jnp.mean(image)
    factor = 1.0 + jax.random.uniform(k_contrast, (), minval=-s.contrast, maxval=s.contrast)
    delta = jax.random.uniform(k_bright, (), minval=-s.brightness, maxval=s.brightness) * 255.0
    image = (image - mean) * factor + mean + delta
    if s.noise:
        spread = jax.random.uniform(k_spread, (), maxval=s.noise) * 255.0
        image = image + spread * jax.random.normal(k_pixels, image.shape)
    image = jnp.clip(image, 0.0, 255.0)
    if s.erase:
        image = _erase(jax.random.fold_in(key, ERASE_TAG), image, s.erase)
    return image


EXTRA_DRAWS_TAG = 0x626C7572  # "blur"
ERASE_TAG = 0x65726173  # "eras"
GAMMA_TAG = 0x67616D6D  # "gamm"
ELASTIC_TAG = 0x656C6173  # "elas"
COLOUR_TAG = 0x636F6C6F  # "colo"
ASPECT_TAG = 0x61737065  # "aspe"
STROKE_TAG = 0x7374726F  # "stro"


def _colour_cast(key: jax.Array, image: jax.Array, largest: float) -> jax.Array:
    """Each channel times its own factor, uniform from 1 - largest to 1 + largest: a cast of
    another light or camera. The per-image standardisation (`--pixels standard`) undoes
    brightness and contrast changes but not this, so it is the one change of colour the
    network sees; without it, a cast shared by the photos of a dark track can decide their
    class."""
    return image * (
        1.0 + jax.random.uniform(key, image.shape[-1:], minval=-largest, maxval=largest)
    )


def _gamma(key: jax.Array, image: jax.Array, largest: float) -> jax.Array:
    """Pixels (as 0..1) raised to a power drawn log-uniformly from 1/(1 + largest) to
    1 + largest. Brightness and contrast changes are undone by the per-image standardisation
    (`--pixels standard`); a gamma change is not: it darkens or lifts the shadows against the
    highlights, as a dusk photo or another camera does."""
    reach = math.log1p(largest)
    power = jnp.exp(jax.random.uniform(key, (), minval=-reach, maxval=reach))
    return 255.0 * (jnp.clip(image, 0.0, 255.0) / 255.0) ** power


def _stroke(key: jax.Array, image: jax.Array, largest: float) -> jax.Array:
    """The image blended toward its 3x3 grey-level dilation (share drawn above 0) or erosion
    (below 0), the share uniform from -largest to largest: dark strokes on a light sign get
    thinner or bolder by up to a pixel each side, as a light or a bold font gives. Tried
    because networks read the dark 60 km/h track as 80 from where its 6 nearly closes, and
    read 4 of its 30 photos as 60 once their dark strokes were thinned (BENCHMARKS.md)."""
    share = jax.random.uniform(key, (), minval=-largest, maxval=largest)
    window = lambda init, op: jax.lax.reduce_window(  # noqa: E731
        image, init, op, (3, 3, 1), (1, 1, 1), "SAME"
    )
    spread = jnp.where(share > 0, window(-jnp.inf, jax.lax.max), window(jnp.inf, jax.lax.min))
    return image + jnp.abs(share) * (spread - image)


BLUR_RADIUS = 6  # taps each side: 3 sigma at the largest blur, 2


def _blur(image: jax.Array, sigma: jax.Array) -> jax.Array:
    """A separable Gaussian blur of an HWC image, edges repeated; sigma 0 leaves it as it is."""
    taps = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
    weights = jnp.where(sigma > 0, jnp.exp(-0.5 * (taps / jnp.maximum(sigma, 1e-6)) ** 2),
                        (taps == 0).astype(jnp.float32))  # fmt: skip
    weights = weights / weights.sum()
    r = BLUR_RADIUS
    padded = jnp.pad(image, ((r, r), (r, r), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    rows = sum(weights[i] * padded[i : i + h] for i in range(2 * r + 1))
    return sum(weights[i] * rows[:, i : i + w] for i in range(2 * r + 1))


# Control points across the side of the elastic field: 6 pixels apart at 48x48, about half a
# digit's height, so strokes bend and glyphs change shape (as handwriting does in Simard et al.
# 2003, whose Gaussian-smoothed field this approximates) while the sign stays whole; at 16
# points (3 pixels apart) a spread of 0.03 tore signs apart.
ELASTIC_POINTS = 8


def _bend(key: jax.Array, side: int, largest: float) -> jax.Array:
    """A smooth random (side, side, 2) displacement field: normal draws at ELASTIC_POINTS x
    ELASTIC_POINTS control points, cubic-interpolated to every pixel, scaled to a spread drawn
    uniformly up to `largest` times the side."""
    k_reach, k_field = jax.random.split(key)
    spread = jax.random.uniform(k_reach, (), maxval=largest) * side
    points = jax.random.normal(k_field, (ELASTIC_POINTS, ELASTIC_POINTS, 2))
    return jax.image.resize(points, (side, side, 2), method="cubic") * spread


def _erase(key: jax.Array, image: jax.Array, largest: float) -> jax.Array:
    """One rectangle of the image painted over in its mean colour (DeVries and Taylor 2017,
    "Cutout"; Zhong et al. 2020): its height and width each uniform up to `largest` times the
    side, its centre anywhere in the image (so an edge may cut it). A sign partly hidden or
    dirty still has to be read. Not random pixels, as Zhong et al. fill it: with standardised
    pixels (the recipe's) each image is scaled by its spread after augmentation, and noise
    would swell the spread and dim the sign."""
    h, w = image.shape[:2]
    k_size, k_centre = jax.random.split(key)
    half = jax.random.uniform(k_size, (2,), maxval=largest / 2) * jnp.array([h, w])
    centre = jax.random.uniform(k_centre, (2,)) * jnp.array([h, w])
    inside = rectangle(centre, half, h, w)[..., None]
    return jnp.where(inside, jnp.mean(image, axis=(0, 1)), image)


def rectangle(centre: jax.Array, half: jax.Array, h: int, w: int) -> jax.Array:
    """(h, w) bool: the pixels whose centres lie within `half` (rows, cols) of `centre`, in
    pixels; an edge of the image may cut it (cutout's rectangle, and CutMix's)."""
    rows = jnp.abs(jnp.arange(h) + 0.5 - centre[0]) < half[0]
    cols = jnp.abs(jnp.arange(w) + 0.5 - centre[1]) < half[1]
    return rows[:, None] & cols[None, :]


def augment(key: jax.Array, images: jax.Array, strengths: Strengths) -> jax.Array:
    """Float32 images in 0..255 (uint8 or float NHWC in), each changed at random."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: _one(k, x, strengths))(keys, images.astype(jnp.float32))


# Test-time augmentation's changes: geometric only and half the training defaults' reach. A
# view's change is the same for every image (its key is the view's), so an image's prediction
# does not depend on the batch it came in.
TTA_STRENGTHS = Strengths(rotate=7.5, scale=0.05, shear=0.05, shift=0.05, brightness=0, contrast=0)


def views(images: jax.Array, count: int, strengths: Strengths = TTA_STRENGTHS) -> jax.Array:
    """(count, batch, h, w, c) float32 copies of the images, copy v changed by view v's draw."""
    images = images.astype(jnp.float32)
    keys = jax.random.split(jax.random.key(0), count)
    return jax.vmap(lambda k: jax.vmap(lambda x: _one(k, x, strengths))(images))(keys)
