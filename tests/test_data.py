"""Data folders: layouts, broken files, errors, the cache and the splits."""

import os
import pickle

import numpy as np
import pytest
from conftest import write_image

from cnn_jax import data
from cnn_jax.data import DataError


def test_cs50_folder_loads_and_skips_broken_files(cs50_folder, tmp_path):
    ds = data.load_folder(cs50_folder, image_size=30, cache_dir=tmp_path / "cache")
    assert ds.images.shape == (14, 30, 30, 3) and ds.images.dtype == np.uint8
    assert sorted(p for p, _ in ds.skipped) == [
        "0/00001_00000.ppm",
        "1/notes.txt",
        "2/00008_00000.ppm",
    ]
    assert all(reason for _, reason in ds.skipped)
    assert np.bincount(ds.labels).tolist() == [4, 5, 5]
    assert ds.num_classes == 3


def test_pixels_match_the_tutorials_opencv_decode(cs50_folder):
    import cv2

    ds = data.load_folder(cs50_folder, image_size=30, use_cache=False)
    for name in ("1/00009_00000.png", "0/00000_00001.ppm", "2/00009_00000.jpg"):
        bgr = cv2.resize(cv2.imread(str(cs50_folder / name)), (30, 30))  # the tutorial's two calls
        np.testing.assert_array_equal(ds.images[list(ds.paths).index(name)], bgr[..., ::-1])


def test_the_pillow_decoder_matches_a_direct_pillow_decode(cs50_folder):
    from PIL import Image

    ds = data.load_folder(cs50_folder, image_size=30, use_cache=False, decoder="pillow")
    i = list(ds.paths).index("1/00009_00000.png")
    with Image.open(cs50_folder / "1" / "00009_00000.png") as im:
        expected = np.asarray(im.convert("RGB").resize((30, 30), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ds.images[i], expected)
    assert len(ds.skipped) == 3  # the same files are broken for either decoder


def test_second_load_comes_from_the_cache(cs50_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = data.load_folder(cs50_folder, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the folder did not change")

    monkeypatch.setattr(data, "decode_files", no_decoding)
    second = data.load_folder(cs50_folder, cache_dir=cache)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.skipped == second.skipped


def test_cache_is_rebuilt_when_a_file_changes(cs50_folder, tmp_path):
    cache = tmp_path / "cache"
    data.load_folder(cs50_folder, cache_dir=cache)
    write_image(cs50_folder / "0" / "00000_00000.ppm", seed=1234, size=(50, 50))
    data.load_folder(cs50_folder, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2
    data.load_folder(cs50_folder, cache_dir=cache, image_size=20)  # the size is in the key too
    assert len(list(cache.glob("*.npz"))) == 3


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_posing_as_the_cache_is_never_loaded(cs50_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    data.load_folder(cs50_folder, cache_dir=cache)
    (path,) = cache.glob("*.npz")
    with open(path, "wb") as fh:
        pickle.dump({"images": _Boom()}, fh)
    ds = data.load_folder(cs50_folder, cache_dir=cache)
    assert not (tmp_path / "pwned").exists()
    assert len(ds.labels) == 14
    assert "ignoring unreadable cache" in capsys.readouterr().err


def test_read_only_cache_folder_only_warns(cs50_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    ds = data.load_folder(cs50_folder, cache_dir=blocker / "cache")
    assert len(ds.labels) == 14
    assert "could not write cache" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root.mkdir(), "holds no class folders"),
        (lambda root: (root / "stop").mkdir(parents=True), "is not a whole number"),
        (lambda root: [(root / c).mkdir(parents=True) for c in ("0", "2")], "1 are missing"),
        (lambda root: [(root / c).mkdir(parents=True) for c in ("0", "1")], "hold no files"),
    ],
)
def test_bad_folders_are_clear_errors(tmp_path, make, message):
    root = tmp_path / "d"
    make(root)
    with pytest.raises(DataError, match=message):
        data.load_folder(root, use_cache=False)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_folder(tmp_path / "nope")


def test_a_folder_of_broken_files_is_an_error(tmp_path):
    (tmp_path / "d" / "0").mkdir(parents=True)
    (tmp_path / "d" / "0" / "a.ppm").write_bytes(b"P6 garbage")
    with pytest.raises(DataError, match="no readable images"):
        data.load_folder(tmp_path / "d", use_cache=False)


def _official_train(root):
    images = root / "GTSRB" / "Final_Training" / "Images"
    for c in range(2):
        d = images / f"{c:05d}"
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(3):
            write_image(d / f"00000_{i:05d}.ppm", seed=c * 3 + i)
            rows.append(f"00000_{i:05d}.ppm;36;40;5;5;30;30;{c}")
        (d / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")
    return root / "GTSRB"


def test_official_training_layout(tmp_path):
    root = _official_train(tmp_path)
    assert data.detect_layout(root) == "gtsrb-train"
    ds = data.load_folder(root, use_cache=False)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.paths[0] == "Final_Training/Images/00000/00000_00000.ppm"


def test_official_test_layout(tmp_path):
    images = tmp_path / "GTSRB" / "Final_Test" / "Images"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate([3, 0, 7]):
        write_image(images / f"{i:05d}.ppm", seed=i)
        rows.append(f"{i:05d}.ppm;36;40;5;5;30;30;{c}")
    (images / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    assert data.detect_layout(tmp_path / "GTSRB") == "gtsrb-test"
    ds = data.load_folder(tmp_path / "GTSRB", use_cache=False)
    assert ds.labels.tolist() == [3, 0, 7]


def test_csv_naming_a_missing_file_is_an_error(tmp_path):
    root = _official_train(tmp_path)
    (root / "Final_Training" / "Images" / "00001" / "00000_00002.ppm").unlink()
    with pytest.raises(DataError, match="names 00000_00002.ppm, which is missing"):
        data.load_folder(root, use_cache=False)


def test_random_split_is_the_tutorials():
    labels = np.arange(26_638) % 43
    train, test = data.split_indices(labels, 0.4, seed=0)
    # sklearn's train_test_split(test_size=0.4): ceil(0.4 * n) test images.
    assert (len(train), len(test)) == (15_982, 10_656)
    assert len(np.intersect1d(train, test)) == 0
    again = data.split_indices(labels, 0.4, seed=0)
    np.testing.assert_array_equal(test, again[1])
    assert not np.array_equal(test, data.split_indices(labels, 0.4, seed=1)[1])


def test_track_split_keeps_tracks_together():
    labels = np.repeat(np.arange(4), 60)  # 4 classes, 2 tracks of 30 each... and more below
    paths = np.array([f"{y}/{(i // 10):05d}_{i % 10:05d}.ppm" for i, y in enumerate(labels)])
    train, test = data.split_indices(labels, 0.4, seed=0, how="track", paths=paths)
    groups = data.track_groups(paths, labels)
    assert not set(groups[train]) & set(groups[test])
    assert set(labels[train]) == set(labels[test]) == {0, 1, 2, 3}
    assert len(train) + len(test) == len(labels)


def test_scale_pixels():
    x = np.array([0, 255], np.uint8)
    np.testing.assert_array_equal(data.scale_pixels(x, "unit"), [0.0, 1.0])
    np.testing.assert_array_equal(data.scale_pixels(x, "raw"), [0.0, 255.0])
    with pytest.raises(ValueError, match="unknown pixel scaling"):
        data.scale_pixels(x, "std")
