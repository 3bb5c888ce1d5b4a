"""Shared fixtures: tiny synthetic data, temporary folders, and the real GTSRB folder if present.

The CPU is split into 8 devices before JAX starts, so the data-parallel path is tested here;
training that does not name --devices uses all of them. Tests ask for CPU devices by name
(`platform="cpu"`, `--platform cpu`), so they run the same on a machine with a GPU; tests marked
`gpu` are about the accelerator and skip, with the reason, where JAX finds none.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

# The `cnn-jax` subprocesses of some tests share the GPU with this process: allocate on demand
# rather than each taking 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# ... and import this checkout, installed or not (a GPU machine's image may only have its files).
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
jax.config.update("jax_num_cpu_devices", 8)

# One XLA compilation cache for the session, shared with pytest-xdist's workers and the `cnn-jax`
# subprocesses: a run and its resumed twin, or one configuration in several tests, compile the
# same program, and loading XLA's executable takes a fraction of compiling it again. The
# executable is the same, so are the numbers; the folder is new each session, made by the first
# process (the workers inherit its name) and removed by it at the end.
_XLA_CACHE = os.environ.get("CNN_JAX_TESTS_XLA_CACHE")
if _XLA_CACHE is None:
    _XLA_CACHE = os.environ["CNN_JAX_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="cnn-jax-xla-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
_CACHE_SETTINGS = {
    "jax_compilation_cache_dir": _XLA_CACHE,
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}
for _name, _value in _CACHE_SETTINGS.items():
    jax.config.update(_name, _value)
    os.environ[_name.upper()] = str(_value)

# Built once a session into a temporary folder (cnn_jax/onednn.py builds into the user's cache).
if "CNN_JAX_TESTS_CACHE_HOME" not in os.environ:
    os.environ["CNN_JAX_TESTS_CACHE_HOME"] = tempfile.mkdtemp(prefix="cnn-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["CNN_JAX_TESTS_CACHE_HOME"], ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = os.environ["CNN_JAX_TESTS_CACHE_HOME"]

REAL_DATA = ROOT.parent / "shared" / "data" / "gtsrb"


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU or TPU: JAX finds only CPU devices here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """A small synthetic set: 43 classes, 10 images each."""
    from cnn_jax.data.synthetic import make_synthetic

    return make_synthetic(n_per_class=10, seed=0)


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "0").is_dir():
        pytest.skip(f"the real GTSRB folder is not at {REAL_DATA}")
    return REAL_DATA


def start_cli(*args, cwd, **env) -> subprocess.Popen:
    """`python -m cnn_jax ARGS` in a subprocess with text pipes, unbuffered, warnings off."""
    return subprocess.Popen(
        [sys.executable, "-m", "cnn_jax", *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


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
