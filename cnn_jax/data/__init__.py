"""The data's path into training: a folder's layout -> decoded images -> cache or pack ->
train / validation / test splits -> pixel scaling; the built-in synthetic signs; sign names.

Never imports TensorFlow or JAX (pixels.py works on JAX arrays it is given).
"""

from cnn_jax.config import Config
from cnn_jax.data.dataset import DataError, Dataset, describe_error
from cnn_jax.data.decode import UNREADABLE, decode_files, decode_image
from cnn_jax.data.layouts import MAX_CLASS_ID, detect_layout, list_files, parse_class_id
from cnn_jax.data.pixels import scale_pixels
from cnn_jax.data.splits import split_indices, split_run, track_groups
from cnn_jax.data.store import (
    default_cache_dir,
    is_packed,
    load_folder,
    load_packed,
    read_npz,
    write_npz,
)
from cnn_jax.data.synthetic import make_synthetic

__all__ = [
    "MAX_CLASS_ID",
    "UNREADABLE",
    "DataError",
    "Dataset",
    "decode_files",
    "decode_image",
    "default_cache_dir",
    "describe_error",
    "detect_layout",
    "is_packed",
    "list_files",
    "load_configured",
    "load_folder",
    "load_packed",
    "make_synthetic",
    "parse_class_id",
    "read_npz",
    "scale_pixels",
    "split_indices",
    "split_run",
    "track_groups",
    "write_npz",
]


def load_configured(cfg: Config, cache_dir=None, use_cache: bool = True) -> Dataset:
    """A run config's data: its folder or pack, or the synthetic signs when it names none."""
    if cfg.data is None:
        return make_synthetic(cfg.synthetic_per_class, cfg.image_size, cfg.num_classes or 43)
    return load_folder(
        cfg.data,
        layout=cfg.layout,
        image_size=cfg.image_size,
        cache_dir=cache_dir,
        use_cache=use_cache,
        decoder=cfg.decoder,
    )
