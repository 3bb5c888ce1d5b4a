"""Where a run's images come from (its data folder or pack, or the built-in synthetic signs),
and how they are split.

Kept apart from data.py, which synthetic.py builds on, so that neither imports the other.
"""

from cnn_jax.config import Config
from cnn_jax.data import Dataset, load_folder, split_indices
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


def split_run(config: Config, dataset: Dataset):
    """(train, validation, test) indices: the test split, then `val_size` of the training side
    (whole tracks with --split track) for validation; the validation set is empty without it."""
    train, test = split_indices(
        dataset.labels, config.test_size, config.seed, config.split, dataset.paths
    )
    if not config.val_size:
        return train, train[:0], test
    # Its own random stream: the same seed would shuffle the training side as it did the set.
    fit, val = split_indices(
        dataset.labels[train], config.val_size, [config.seed, 1], config.split,
        dataset.paths[train],
    )  # fmt: skip
    return train[fit], train[val], test
