"""A built-in synthetic traffic-sign set: 43 classes of rendered signs, nothing to download.

Each class is a fixed (shape, colours, glyph) triple; every image draws a random scale, rotation,
position, blur, noise and background. It lets `cnn-jax train` with no data folder show the whole
pipeline in about a minute, and it is what the tests train on.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cnn_jax.data.dataset import Dataset
from cnn_jax.errors import UserError

_SHAPES = ("circle", "triangle", "inverted", "octagon", "diamond", "square")
# (border, fill, glyph) colours, loosely after real sign families.
_PALETTES = (
    ((200, 20, 30), (245, 245, 245), (10, 10, 10)),  # prohibitory: red ring, white, black
    ((20, 60, 190), (20, 60, 190), (250, 250, 250)),  # mandatory: blue, white glyph
    ((230, 190, 20), (250, 220, 40), (10, 10, 10)),  # priority: yellow
    ((40, 40, 40), (250, 250, 250), (60, 60, 60)),  # end-of: white, grey glyph
)
_GLYPHS = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ!?<>^+=#%&*"
_CANVAS = 64
_TRACK_LENGTH = 5  # images of one drawn sign, like GTSRB's tracks, so --split track works


def _class_style(c: int):
    return _SHAPES[c % len(_SHAPES)], _PALETTES[(c // len(_SHAPES)) % len(_PALETTES)], _GLYPHS[c]


def _outline(shape: str, box: tuple[int, int, int, int]):
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "inverted":
        return [(x0, y0), (x1, y0), (cx, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "octagon":
        a = np.pi / 8 + np.arange(8) * np.pi / 4
        return list(zip(cx + r * np.cos(a), cy + r * np.sin(a)))
    return None  # circle and square are drawn directly


def _draw_sign(c: int, font) -> Image.Image:
    """The class's sign on a transparent canvas."""
    shape, (border, fill, ink), glyph = _class_style(c)
    im = Image.new("RGBA", (_CANVAS, _CANVAS), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    outer, inner = (2, 2, _CANVAS - 3, _CANVAS - 3), (9, 9, _CANVAS - 10, _CANVAS - 10)
    for box, colour in ((outer, border), (inner, fill)):
        if shape == "circle":
            d.ellipse(box, fill=colour)
        elif shape == "square":
            d.rectangle(box, fill=colour)
        else:
            d.polygon(_outline(shape, box), fill=colour)
    d.text((_CANVAS / 2, _CANVAS / 2 + 3), glyph, fill=ink, font=font, anchor="mm")
    return im


def make_synthetic(
    n_per_class: int = 100, image_size: int = 30, num_classes: int = 43, seed: int = 0
) -> Dataset:
    """Renders `n_per_class` images of each class, reproducibly for a given seed."""
    if not 1 <= num_classes <= len(_GLYPHS):
        raise UserError(f"synthetic data has 1 to {len(_GLYPHS)} classes, not {num_classes}")
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=36)
    signs = [_draw_sign(c, font) for c in range(num_classes)]
    images, labels, paths = [], [], []
    for c in range(num_classes):
        for i in range(n_per_class):
            if i % _TRACK_LENGTH == 0:  # a new physical sign: new pose and light
                angle = rng.uniform(-15, 15)
                light = rng.uniform(0.6, 1.2)
                background = rng.integers(0, 256, 3)
            size = int(rng.uniform(0.7, 1.0) * _CANVAS)
            sign = signs[c].rotate(angle + rng.normal(0, 2), Image.Resampling.BILINEAR)
            sign = sign.resize((size, size), Image.Resampling.BILINEAR)
            bg = np.clip(background + rng.normal(0, 25, (_CANVAS, _CANVAS, 3)), 0, 255)
            canvas = Image.fromarray(bg.astype(np.uint8), "RGB")
            offset = rng.integers(0, _CANVAS - size + 1, 2)
            canvas.paste(sign, tuple(int(o) for o in offset), sign)
            canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))
            canvas = canvas.resize((image_size, image_size), Image.Resampling.BILINEAR)
            x = np.asarray(canvas, np.float32) * light + rng.normal(0, 6, (image_size,) * 2 + (3,))
            images.append(np.clip(x, 0, 255).astype(np.uint8))
            labels.append(c)
            paths.append(f"synthetic/{c}/{i // _TRACK_LENGTH:05d}_{i % _TRACK_LENGTH:05d}.ppm")
    return Dataset(
        images=np.stack(images),
        labels=np.asarray(labels, np.int32),
        paths=np.asarray(paths, dtype=str),
        skipped=(),
    )
