"""Decoded sets on disk and the loader that uses them: `.npz` files (caches and `cnn-jax
pack` output, never pickles) and `load_folder`, which decodes a folder once and reuses its
cache while the folder's files are unchanged."""

import hashlib
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from cnn_jax.config import MAX_IMAGE_SIZE, SMALLEST_IMAGE_SIZE
from cnn_jax.data.dataset import DataError, Dataset, describe_error
from cnn_jax.data.decode import decode_files
from cnn_jax.data.layouts import MAX_CLASS_ID, detect_layout, list_files
from cnn_jax.files import refuse_inside

# Bump when decoding changes, so old caches are not reused (2: OpenCV decodes by default).
_CACHE_VERSION = 2


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnn-jax"


def _cache_key(root: Path, files: list[Path], layout: str, image_size: int, decoder: str) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{layout}|{image_size}|{decoder}\n".encode())
    prefix = len(str(root)) + 1
    for f in map(str, files):
        st = os.stat(f)
        # surrogateescape: a file name that is not UTF-8 (Linux allows any bytes) keeps its bytes.
        h.update(f"{f[prefix:]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(errors="surrogateescape"))
    return h.hexdigest()[:24]


def read_npz(path: Path | str) -> Dataset:
    """A decoded set from a cache or pack `.npz` (no pickles), checked for consistent arrays."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, paths = z["images"], z["labels"], z["paths"]
            skipped_paths, skipped_reasons = z["skipped_paths"], z["skipped_reasons"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # NumPy's own message for a non-archive suggests loading it as a pickle: never.
        why = "not a .npz of plain arrays" if "pickle" in str(e) else describe_error(e, path)
        raise DataError(f"cannot read {path} as a cnn-jax .npz: {why}") from None
    except MemoryError:  # NumPy sizes an array by its header before reading a byte of it
        why = "its arrays need more memory than this machine has (a damaged header, or too big)"
        raise DataError(f"cannot read {path}: {why}") from None
    n = len(labels) if labels.ndim == 1 else -1
    problem = (
        "images are not (N, size, size, 3) uint8"
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3
        or images.shape[1] != images.shape[2]
        # a 0x0 or 1x1 pack would suggest an --image-size no model takes
        else f"its images are {images.shape[1]}x{images.shape[2]}, outside the "
        f"{SMALLEST_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels a side that cnn-jax trains on"
        if not SMALLEST_IMAGE_SIZE <= images.shape[1] <= MAX_IMAGE_SIZE
        else "labels are not one integer per image"
        if labels.dtype.kind not in "iu" or n != len(images) or (n and labels.min() < 0)
        # as for a folder's class ids; larger ones would wrap in int32 or size arrays by them
        else f"labels go up to {labels.max()}, above {MAX_CLASS_ID}"
        if n and labels.max() > MAX_CLASS_ID
        else "paths are not one string per image"
        if paths.dtype.kind != "U" or paths.shape != (n,)
        else "skipped files and reasons do not pair up"
        if skipped_paths.shape != skipped_reasons.shape or skipped_paths.ndim != 1
        else None
    )  # fmt: skip
    if problem:
        raise DataError(f"{path} is not a usable cnn-jax .npz: {problem}")
    skipped = tuple(zip(skipped_paths.tolist(), skipped_reasons.tolist()))
    return Dataset(images, labels.astype(np.int32), paths, skipped)


def write_npz(path: Path | str, ds: Dataset, compress: bool = False) -> None:
    """Writes `ds` atomically (a temporary file renamed), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            (np.savez_compressed if compress else np.savez)(
                fh,
                images=ds.images,
                labels=ds.labels,
                paths=ds.paths,
                skipped_paths=np.asarray([p for p, _ in ds.skipped], dtype=str),
                skipped_reasons=np.asarray([r for _, r in ds.skipped], dtype=str),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_cache(path: Path) -> Dataset | None:
    try:
        return read_npz(path)
    except DataError as e:
        print(f"warning: ignoring unreadable cache: {e}; rebuilding it", file=sys.stderr)
        return None


def _write_cache(path: Path, ds: Dataset) -> None:
    try:
        write_npz(path, ds)
    except OSError as e:
        print(f"warning: could not write cache {path}: {e}", file=sys.stderr)


def load_packed(path: Path | str, image_size: int) -> Dataset:
    """A set written by `cnn-jax pack`, at the image size it was packed with."""
    ds = read_npz(path)
    size = ds.images.shape[1]
    if size != image_size:
        raise DataError(
            f"{path} holds {size}x{size} images: use --image-size {size}, or pack the folder "
            f"again with --image-size {image_size}"
        )
    if not len(ds.labels):
        raise DataError(f"{path} holds no images")
    return ds


def is_packed(path: Path | str) -> bool:
    return Path(path).suffix == ".npz" and Path(path).is_file()


def _below(root: Path):
    """A file's path relative to `root`, as text: string slicing, since Path.relative_to took
    a third of a cold load's time on 26,640 files."""
    prefix = os.fspath(root) + os.sep

    def below(path) -> str:
        text = os.fspath(path)
        if not text.startswith(prefix):
            raise ValueError(f"{text} is not below {root}")  # a bug: the layouts list below it
        return text[len(prefix) :]

    return below


def load_folder(
    root: Path | str,
    *,
    layout: str = "auto",
    image_size: int = 30,
    cache_dir: Path | str | None = None,
    use_cache: bool = True,
    decoder: str = "opencv",
) -> Dataset:
    """Loads a data folder, reusing the on-disk cache when the folder's files are unchanged, or
    a `.npz` file written by `cnn-jax pack`."""
    root = Path(root).resolve()
    if is_packed(root):
        return load_packed(root, image_size)
    if layout == "auto" and root.is_dir():
        layout = detect_layout(root)
    files, labels = list_files(root, layout)
    cache_path = None
    if use_cache:
        key = _cache_key(root, files, layout, image_size, decoder)
        cache = Path(cache_dir or default_cache_dir())
        # a cache file there would load as one more (unreadable) image
        refuse_inside(cache, root, "the data folder", "--cache-dir")
        cache_path = cache.resolve() / f"{layout}-{key}.npz"
        if cache_path.is_file() and (ds := _read_cache(cache_path)) is not None:
            return ds
    images, kept, skipped = decode_files(files, image_size, decoder)
    if len(kept) == 0:
        raise DataError(f"no readable images in {root} ({len(skipped)} files could not be read)")
    below = _below(root)
    ds = Dataset(
        images=images,
        labels=np.asarray(labels, np.int32)[kept],
        paths=np.asarray([below(files[i]) for i in kept], dtype=str),
        skipped=tuple((below(f), r) for f, r in skipped),
    )
    if cache_path is not None:
        _write_cache(cache_path, ds)
    return ds
