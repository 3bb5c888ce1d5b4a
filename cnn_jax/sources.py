"""Where a run's images come from: its data folder or pack, or the built-in synthetic signs.

Kept apart from data.py, which synthetic.py builds on, so that neither imports the other.
"""

from cnn_jax.config import Config
from cnn_jax.data import Dataset, load_folder
from cnn_jax.synthetic import make_synthetic


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
    )
