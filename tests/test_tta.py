"""Test-time augmentation: the mean of the image's and its changed copies' probabilities."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from cnn_jax import augment
from cnn_jax.cli import main
from cnn_jax.config import Config
from cnn_jax.errors import UserError
from cnn_jax.steps import create_trainer


def _predictor_and_weights(model=3, ensemble=1):
    config = Config(model=model, image_size=16, ensemble=ensemble, platform="cpu", devices=1)
    trainer, state = create_trainer(config, 43)
    return trainer.predictor, state.weights


def test_tta_averages_the_image_and_its_views_whatever_the_batch(tiny):
    predictor, weights = _predictor_and_weights()
    images = tiny.images[:4, :16, :16]
    plain = np.asarray(predictor.probabilities(weights, images))
    tta = dataclasses.replace(predictor, tta=4)
    views = augment.views(images, 3)
    each = [plain] + [np.asarray(predictor.probabilities(weights, v)) for v in views]
    got = np.asarray(tta.probabilities(weights, images))
    np.testing.assert_allclose(got, np.mean(each, axis=0), atol=1e-6)
    assert np.abs(got - plain).max() > 1e-5  # the views change an untrained net's outputs
    # Each view changes every image alike: an image's outputs do not depend on its batch.
    alone = np.asarray(tta.probabilities(weights, images[2:3]))
    np.testing.assert_allclose(alone[0], got[2], atol=1e-6)


def test_tta_views_are_the_geometric_changes_only():
    flat = np.full((1, 16, 16, 3), 100, np.uint8)  # no brightness or contrast change shows
    views = np.asarray(augment.views(flat, 5))
    np.testing.assert_allclose(views, 100.0, atol=1e-4)
    ramp = np.broadcast_to(np.arange(16, dtype=np.uint8)[None, :, None, None] * 10, (1, 16, 16, 3))
    moved = np.asarray(augment.views(ramp, 5))
    assert all(np.abs(v - ramp).max() > 1 for v in moved)  # each view is its own change


def test_tta_of_an_ensemble_evaluates_with_member_accuracies(tiny):
    from cnn_jax.predictor import evaluate

    predictor, weights = _predictor_and_weights(model=2, ensemble=2)
    images, labels = tiny.images[:20, :16, :16], tiny.labels[:20]
    result = evaluate(dataclasses.replace(predictor, tta=3), weights, images, labels)
    probs = np.asarray(dataclasses.replace(predictor, tta=3).probabilities(weights, images))
    assert result["accuracy"] == np.mean(probs.argmax(1) == labels)
    assert len(result["member_accuracy"]) == 2
    assert jax.tree.leaves(weights)[0].shape[0] == 2


def test_a_tta_out_of_range_is_one_line_and_exit_2(tmp_path, capsys):
    for value in ("0", "33"):
        assert main(["evaluate", str(tmp_path), "--tta", value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--tta must be between 1 and 32" in err


def _evaluated(capsys, *args):
    capsys.readouterr()
    assert main(["evaluate", *args, "--json", "--platform", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_committee_of_runs_at_other_image_sizes_averages_their_probabilities(tmp_path, capsys):
    from cnn_jax.inference import load_checkpoint, probabilities_on

    runs = {}
    for name, size, seed, extra in [
        ("a", 16, 0, []),
        ("b", 20, 0, ["--pixels", "grey"]),
        ("c", 16, 1, []),  # another seed: another split
    ]:
        runs[name] = str(tmp_path / name)
        args = ["train", "--model", "2", "--image-size", str(size), "--seed", str(seed),
                "--synthetic-per-class", "6", "--epochs", "1", "--platform", "cpu",
                "--devices", "1", "--quiet", "--workdir", runs[name], *extra]  # fmt: skip
        assert main(args) == 0
    result = _evaluated(capsys, runs["a"], "--average-with", runs["b"])
    tested = [probabilities_on(load_checkpoint(runs[r], "cpu")) for r in "ab"]
    labels = tested[0].labels
    mean = (tested[0].probabilities + tested[1].probabilities) / 2
    assert result["accuracy"] == np.mean(mean.argmax(-1) == labels) and result["n"] == len(labels)
    alone = [_evaluated(capsys, runs[r])["accuracy"] for r in "ab"]
    assert result["member_accuracy"] == pytest.approx(alone, abs=1e-6)
    assert np.abs(tested[0].probabilities - tested[1].probabilities).max() > 1e-3  # two networks
    np.testing.assert_allclose(
        result["loss"], np.mean(-np.log(mean[np.arange(len(labels)), labels] + 1e-12)), rtol=1e-6
    )
    # Seed 1 splits the signs apart: its training images would be in seed 0's test split.
    assert main(["evaluate", runs["a"], "--average-with", runs["c"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "were tested on other images" in err


def test_a_committee_refuses_runs_that_know_other_classes(monkeypatch):
    from cnn_jax import inference

    labels, paths = np.array([0, 1]), np.array(["0/a.ppm", "1/b.ppm"])
    tested = {
        name: inference.Tested(None, labels, np.full((2, classes), 1 / classes), "", name, paths)
        for name, classes in [("a", 43), ("b", 50)]
    }
    monkeypatch.setattr(inference, "probabilities_on", lambda run, *args: tested[run])
    with pytest.raises(UserError, match="b knows 50 classes and a 43"):
        inference.evaluate_committee(["a", "b"])
