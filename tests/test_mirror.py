"""`--aug-flip`: GTSRB's signs whose mirror image is a sign, mirrored with their labels."""

import jax
import numpy as np

from cnn_jax import mirror
from cnn_jax.cli import main

CLASSES = np.arange(mirror.GTSRB_CLASSES)


def _signs(copies: int):
    """`copies` random 6x6 images of every class, and their labels."""
    labels = np.tile(CLASSES, copies)
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 6, 6, 3), dtype=np.uint8)
    return images, labels


def test_at_chance_one_every_sign_with_a_mirror_is_mirrored_and_takes_its_class():
    images, labels = _signs(copies=40)
    targets = np.eye(mirror.GTSRB_CLASSES, dtype=np.float32)[labels] * 0.9 + 0.1 / 43
    out, out_labels, out_targets = map(
        np.asarray, mirror.mirror(jax.random.key(1), images, labels, 1.0, targets)
    )
    flips = (images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1])  # as MIRRORS
    used = [set(), set(), set()]
    for i, c in enumerate(labels):
        if not any(c in m for m in mirror.MIRRORS):  # a 60 km/h sign mirrored is no sign
            assert np.array_equal(out[i], images[i]) and out_labels[i] == c
            continue
        ways = [k for k, flipped in enumerate(flips) if np.array_equal(out[i], flipped[i])]
        assert len(ways) == 1, c  # mirrored (random pixels: no two ways look alike)
        assert mirror.MIRRORS[ways[0]].get(c) == out_labels[i], c  # c's mirror, and its class
        assert out_targets[i].argmax() == out_labels[i]  # the teacher's belief follows
        used[ways[0]].add(c)
    assert 19 in used[0] and 1 in used[1] and 32 in used[2]
    assert {12, 15, 17} <= used[0] & used[1] & used[2]  # each of their mirrors drawn


def test_a_mirror_keeps_a_left_and_right_pair_apart():
    # A curve left mirrored is a curve right: the label swaps and the pixels turn round.
    images, labels = _signs(copies=1)
    out, out_labels, _ = mirror.mirror(jax.random.key(2), images, labels, 1.0)
    for left, right in [(19, 20), (33, 34), (36, 37), (38, 39)]:
        assert out_labels[left] == right and out_labels[right] == left
        np.testing.assert_array_equal(out[left], images[left][:, ::-1])


def test_the_chance_is_how_often_a_sign_with_a_mirror_is_mirrored():
    labels = np.full(4000, 19)
    images = np.zeros((4000, 2, 2, 1), np.float32)
    _, out_labels, _ = mirror.mirror(jax.random.key(3), images, labels, 0.3)
    assert 0.27 < np.mean(np.asarray(out_labels) == 20) < 0.33
    _, none, _ = mirror.mirror(jax.random.key(3), images, labels, 0.0)
    assert np.all(np.asarray(none) == 19)


def test_a_run_mirrors_gtsrb_only(tmp_path, capsys):
    args = ["train", "--model", "1", "--augment", "--aug-flip", "0.5", "--epochs", "1"]
    args += ["--synthetic-per-class", "2", "--platform", "cpu", "--devices", "1"]
    code = main([*args, "--num-classes", "44", "--workdir", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--aug-flip knows GTSRB's 43 classes only; this run has 44" in err
    assert main([*args, "--workdir", str(tmp_path / "gtsrb")]) == 0  # the step compiles and runs
