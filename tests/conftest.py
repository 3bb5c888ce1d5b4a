"""Shared fixtures: tiny synthetic data, temporary folders, and the real GTSRB folder if present.

The CPU is split into 8 devices before JAX starts, so the data-parallel path is tested here;
training that does not name --devices uses all of them.
"""

from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

jax.config.update("jax_num_cpu_devices", 8)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gtsrb"


@pytest.fixture(scope="session")
def tiny():
    """A small synthetic set: 43 classes, 10 images each."""
    from cnn_jax.synthetic import make_synthetic

    return make_synthetic(n_per_class=10, seed=0)


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "0").is_dir():
        pytest.skip(f"the real GTSRB folder is not at {REAL_DATA}")
    return REAL_DATA


def write_image(path: Path, seed: int = 0, size=(40, 36), fmt=None) -> None:
    """A random RGB image in whatever format the suffix says."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, format=fmt)


@pytest.fixture
def cs50_folder(tmp_path) -> Path:
    """DIR/<class>/<images> with 3 classes, mixed formats, and three broken files."""
    root = tmp_path / "gtsrb"
    for c in range(3):
        for i in range(4):
            write_image(root / str(c) / f"{c:05d}_{i:05d}.ppm", seed=10 * c + i)
    write_image(root / "1" / "00009_00000.png", seed=99)
    write_image(root / "2" / "00009_00000.jpg", seed=98)
    (root / "0" / "00001_00000.ppm").write_bytes(b"")  # zero bytes, as in the real set
    (root / "1" / "notes.txt").write_text("not an image")
    good = (root / "2" / "00002_00000.ppm").read_bytes()
    (root / "2" / "00008_00000.ppm").write_bytes(good[: len(good) // 2])  # truncated
    return root
