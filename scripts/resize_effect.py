"""Measures what the resize filter does to accuracy: Pillow bilinear (ours) vs OpenCV's.

    pip install opencv-python-headless
    python scripts/resize_effect.py ../shared/data/gtsrb --seeds 0 1 2

The tutorial loads with `cv2.imread` + `cv2.resize(img, (30, 30))` (INTER_LINEAR, no
antialiasing when shrinking). This script loads the same files both ways and trains Model 2 on
each with identical settings, printing the test accuracy per seed.
"""

import argparse
import dataclasses
from pathlib import Path

import cv2  # script-only dependency; the package never imports it
import numpy as np

from cnn_jax import data
from cnn_jax.config import Config
from cnn_jax.train import fit


def opencv_images(root, ds: data.Dataset) -> np.ndarray:
    """The tutorial's loading, for the files our loader kept, converted BGR -> RGB."""
    out = np.empty_like(ds.images)
    for i, rel in enumerate(ds.paths):
        img = cv2.imread(str(root / rel))
        out[i] = cv2.resize(img, (ds.images.shape[2], ds.images.shape[1]))[..., ::-1]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--model", type=int, default=2)
    args = p.parse_args()
    root = Path(args.data).resolve()
    pil = data.load_folder(root)
    cv = dataclasses.replace(pil, images=opencv_images(root, pil))
    diff = np.abs(pil.images.astype(int) - cv.images.astype(int))
    print(f"mean |pillow - opencv| per pixel: {diff.mean():.2f} (0..255), max {diff.max()}")
    print(f"{'seed':>4} {'pillow':>8} {'opencv':>8}")
    for seed in args.seeds:
        cfg = Config(model=args.model, seed=seed, data=str(root))
        accs = [fit(cfg, ds, verbose=False)[1]["test_accuracy"] for ds in (pil, cv)]
        print(f"{seed:>4} {accs[0]:>8.4f} {accs[1]:>8.4f}", flush=True)


if __name__ == "__main__":
    main()
