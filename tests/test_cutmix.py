"""`--aug-cutmix`: a rectangle of another image of the batch pasted over an image, its target
the two labels weighted by their shares of the pixels."""

import json

import jax
import numpy as np
import optax
import pytest

from cnn_jax import cutmix
from cnn_jax.cli import main
from cnn_jax.config import Config, Strengths
from cnn_jax.steps import create_trainer, cross_entropy, dropout_key, step_key


def _batch(n=64, side=12):
    # Random pixels: no two images agree anywhere by chance (a pasted pixel is told apart).
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (n, side, side, 3)).astype(np.float32)


def test_each_image_keeps_its_pixels_outside_one_rectangle_of_its_partners():
    images = _batch()
    out, partner, share = map(
        np.asarray, cutmix.cutmix(jax.random.key(1), images, np.ones(len(images)), 1.0)
    )
    pasted_areas = []
    for i, j in enumerate(partner):
        pasted = np.any(out[i] != images[i], axis=-1)
        np.testing.assert_array_equal(out[i][pasted], images[j][pasted])  # the partner's pixels
        if j == i:  # pasted onto itself: nothing to see, but its share says what was drawn
            continue
        rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
        if len(rows):  # one rectangle, whole
            assert pasted[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
            assert pasted.sum() == len(rows) * len(cols)
        assert share[i] == pytest.approx(1 - pasted.mean())
        pasted_areas.append(pasted.mean())
    # The paper's area is uniform in 0..1 before clipping at the edges: a mean below a half.
    assert 0.15 < np.mean(pasted_areas) < 0.5
    assert np.max(pasted_areas) > 0.6 and np.min(pasted_areas) < 0.1


def test_the_chance_is_how_often_an_image_gets_a_rectangle():
    images = np.zeros((4000, 4, 4, 1), np.float32)
    _, _, share = cutmix.cutmix(jax.random.key(2), images, np.ones(4000), 0.3)
    assert 0.27 < np.mean(np.asarray(share) < 1) < 0.33
    out, _, none = cutmix.cutmix(jax.random.key(2), _batch(), np.ones(64), 0.0)
    np.testing.assert_array_equal(out, _batch())
    assert np.all(np.asarray(none) == 1)


def test_the_padding_of_a_last_batch_is_never_pasted():
    images = _batch()
    weights = np.r_[np.ones(40), np.zeros(24)]  # the last 24 rows pad the batch
    out, partner, share = map(np.asarray, cutmix.cutmix(jax.random.key(3), images, weights, 1.0))
    from_padding = weights[partner] == 0
    assert from_padding.sum() > 10
    assert np.all(share[from_padding] == 1)
    np.testing.assert_array_equal(out[from_padding], images[from_padding])


def test_the_loss_weighs_both_labels_by_their_shares():
    logits = np.random.default_rng(4).normal(size=(6, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0])
    partner = np.array([1, 0, 3, 2, 5, 4])
    share = np.array([0.75, 1.0, 0.5, 0.2, 0.0, 0.9], np.float32)
    weights = np.ones(6, np.float32)
    loss = cross_entropy(logits, labels, weights, 0.1, mix=(partner, share))
    smoothed = optax.smooth_labels(np.eye(5, dtype=np.float32)[labels], 0.1)
    own = optax.softmax_cross_entropy(logits, smoothed)
    theirs = optax.softmax_cross_entropy(logits, smoothed[partner])
    np.testing.assert_allclose(loss, np.mean(share * own + (1 - share) * theirs), rtol=1e-6)
    # No smoothing: the labels' one-hot targets, mixed alike.
    plain = cross_entropy(logits, labels, weights, 0.0, mix=(partner, share))
    own = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    theirs = optax.softmax_cross_entropy_with_integer_labels(logits, labels[partner])
    np.testing.assert_allclose(plain, np.mean(share * own + (1 - share) * theirs), rtol=1e-6)
    # A teacher's probabilities (--distill-from) are mixed as they are, never smoothed.
    teacher = np.asarray(jax.nn.softmax(logits[::-1] * 2))
    taught = cross_entropy(logits, labels, weights, 0.1, teacher, (partner, share))
    own = optax.softmax_cross_entropy(logits, teacher)
    theirs = optax.softmax_cross_entropy(logits, teacher[partner])
    np.testing.assert_allclose(taught, np.mean(share * own + (1 - share) * theirs), rtol=1e-6)


def test_the_step_trains_on_the_pasted_images_against_their_mixed_targets():
    # Every other change off, dropout off: the step's loss is the network's on the pasted
    # batch against the targets cutmix's own draws mix (one image off gives another loss).
    still = Strengths(rotate=0, scale=0, shear=0, shift=0, brightness=0, contrast=0, cutmix=1.0)
    config = Config(model=3, augment=True, strengths=still, dropout=0.0, label_smoothing=0.1,
                    image_size=12, platform="cpu", devices=1, conv="lax")  # fmt: skip
    trainer, state = create_trainer(config, 5)
    images = _batch(16).round()
    labels = np.arange(16) % 5
    weights = np.ones(16, np.float32)
    new = trainer._member_step(state, images, labels, weights, 0)
    key = jax.random.fold_in(step_key(0, "augment", 0), cutmix.CUTMIX_TAG)
    pasted, partner, share = cutmix.cutmix(key, images, weights, 1.0)
    assert np.mean(np.asarray(share) < 1) > 0.5
    logits, _ = trainer.apply(state.params, pasted, dropout_key(0, 0), state.batch_stats)
    mixed = cross_entropy(logits, labels, weights, 0.1, mix=(partner, share))
    assert float(new.metrics[0]) / 16 == pytest.approx(float(mixed), rel=1e-5)
    unmixed = cross_entropy(logits, labels, weights, 0.1)
    assert abs(float(mixed) - float(unmixed)) > 1e-2


def test_a_run_with_cutmix_trains_and_differs_from_one_without(tmp_path):
    args = ["train", "--model", "1", "--augment", "--epochs", "1", "--synthetic-per-class", "3"]
    args += ["--platform", "cpu", "--devices", "1", "--quiet"]
    losses = {}
    for name, extra in [("plain", []), ("cutmix", ["--aug-cutmix", "1"])]:
        assert main([*args, *extra, "--workdir", str(tmp_path / name)]) == 0
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        losses[name] = metrics["epochs"][0]["train_loss"]
    assert losses["plain"] != losses["cutmix"]
