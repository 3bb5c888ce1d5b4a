"""The real GTSRB folder in ../shared/data/gtsrb: loading, and a short real training run."""

import functools
import time

import pytest

from cnn_jax import data, train
from cnn_jax.config import Config as _Config

# CPU devices wherever the suite runs (conftest.py); tests marked gpu are about the accelerator.
Config = functools.partial(_Config, platform="cpu")

pytestmark = pytest.mark.slow


def test_shared_set_loads_with_its_two_empty_files_skipped(real_data, tmp_path):
    t0 = time.perf_counter()
    ds = data.load_folder(real_data, cache_dir=tmp_path)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = data.load_folder(real_data, cache_dir=tmp_path)
    warm = time.perf_counter() - t0
    print(f"cold load {cold:.2f}s, warm load {warm:.2f}s")
    assert len(ds.labels) == len(again.labels) == 26_638
    assert sorted(p for p, _ in ds.skipped) == ["33/00015_00004.ppm", "7/00026_00023.ppm"]
    assert ds.num_classes == 43 and ds.images.shape[1:] == (30, 30, 3)


def test_two_epochs_of_model_2_learn_the_real_signs(real_data, tmp_path):
    ds = data.load_folder(real_data, cache_dir=tmp_path)
    _, m = train.fit(Config(model=2, epochs=2, seed=0, devices=1), ds, verbose=False)
    assert (m["n_train"], m["n_test"]) == (15_982, 10_656)
    assert m["test_accuracy"] > 0.8, m  # full 10-epoch runs reach about 0.98 (README)
