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


def _signs_folder(root):
    """The synthetic signs as files, so that every image size reads the same photos."""
    from PIL import Image

    from cnn_jax.data.synthetic import make_synthetic

    signs = make_synthetic(n_per_class=6, image_size=40)
    for image, path in zip(signs.images, signs.paths):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / path)
    return root / "synthetic"


def test_a_committee_of_runs_at_other_image_sizes_averages_their_probabilities(tmp_path, capsys):
    from cnn_jax.inference import load_checkpoint, probabilities_on

    folder, cache = _signs_folder(tmp_path), str(tmp_path / "cache")
    runs = {}
    for name, size, seed, extra in [
        ("a", 16, 0, []),
        ("b", 20, 0, ["--pixels", "grey"]),
        ("c", 16, 1, []),  # another seed: another split
    ]:
        runs[name] = str(tmp_path / name)
        args = ["train", str(folder), "--model", "2", "--image-size", str(size), "--seed",
                str(seed), "--epochs", "1", "--platform", "cpu", "--devices", "1", "--quiet",
                "--cache-dir", cache, "--workdir", runs[name], *extra]  # fmt: skip
        assert main(args) == 0
    result = _evaluated(capsys, runs["a"], "--average-with", runs["b"], "--cache-dir", cache)
    tested = [probabilities_on(load_checkpoint(runs[r], "cpu"), cache_dir=cache) for r in "ab"]
    labels = tested[0].labels
    assert np.array_equal(tested[1].paths, tested[0].paths) and result["n"] == len(labels)
    assert np.abs(tested[0].probabilities - tested[1].probabilities).max() > 1e-3  # two networks
    mean = (tested[0].probabilities + tested[1].probabilities) / 2
    assert result["accuracy"] == np.mean(mean.argmax(-1) == labels)
    np.testing.assert_allclose(
        result["loss"], np.mean(-np.log(mean[np.arange(len(labels)), labels] + 1e-12)), rtol=1e-6
    )
    alone = [_evaluated(capsys, runs[r], "--cache-dir", cache)["accuracy"] for r in "ab"]
    assert result["committee_accuracy"] == pytest.approx(alone, abs=1e-6)
    wrong = [t.probabilities.argmax(-1) != labels for t in tested]
    assert result["wrong_in_every_run"] == np.sum(wrong[0] & wrong[1])
    assert result["wrong_in_every_run"] > 0
    assert result["checkpoint"] == result["committee"][0] and len(result["committee"]) == 2
    assert main(["evaluate", runs["a"], "--average-with", runs["b"], "--cache-dir", cache]) == 0
    text = capsys.readouterr().out
    assert f"averaged with: {result['committee'][1]}" in text
    assert f"alone, {result['committee'][1]}: accuracy {alone[1]:.4f}" in text
    assert f"wrong in every run: {result['wrong_in_every_run']:,} images" in text
    # Seed 1 splits the signs apart: its training images would be in seed 0's test split.
    args = ["evaluate", runs["a"], "--average-with", runs["c"], "--cache-dir", cache]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "were tested on other images" in err
    # On a folder every image is tested, so any runs of its classes may sit together.
    on_folder = _evaluated(capsys, runs["a"], str(folder), "--average-with", runs["c"],
                           "--cache-dir", cache)  # fmt: skip
    assert on_folder["n"] == 43 * 6
    _a_committee_classifies_files(capsys, runs, sorted(folder.rglob("*.ppm"))[:3])


def _a_committee_classifies_files(capsys, runs, files):
    """`predict --average-with`: the classes ranked by the runs' mean probabilities, each
    run's own pick beside them."""
    files = [str(f) for f in files]

    def predicted(*args):
        capsys.readouterr()
        assert main(["predict", *args, *files, "--json", "--platform", "cpu"]) == 0
        return json.loads(capsys.readouterr().out)

    alone = [predicted(runs[r], "--top-k", "43") for r in "ab"]
    both = predicted(runs["a"], "--average-with", runs["b"])
    for n, row in enumerate(both):
        each = [{t["class"]: t["probability"] for t in a[n]["top"]} for a in alone]
        mean = {c: (each[0][c] + each[1][c]) / 2 for c in each[0]}
        best = sorted(mean, key=lambda c: -mean[c])[:3]
        assert [t["class"] for t in row["top"]] == best
        assert [t["probability"] for t in row["top"]] == pytest.approx([mean[c] for c in best])
        picks = [(r["run"], r["class"]) for r in row["runs"]]
        assert picks == [(runs[r], a[n]["top"][0]["class"]) for r, a in zip("ab", alone)]
    assert main(["predict", runs["a"], "--average-with", runs["b"], files[0]]) == 0
    assert f"run {runs['b']}: " in capsys.readouterr().out


def _stub_run(name, classes=43, size=16, data="d", config_classes=None):
    """What the committee's checks read of a restored run."""
    from pathlib import Path
    from types import SimpleNamespace

    return SimpleNamespace(
        directory=Path(name),
        meta=SimpleNamespace(num_classes=classes, imported_from=None),
        config=Config(image_size=size, data=data, num_classes=config_classes),
    )


@pytest.mark.parametrize(
    "runs, message",
    [
        ([("r",), ("r",)], "a run is in the committee twice"),
        ([("r",), ("s",), ("s",)], "a run is in the committee twice"),
        ([("r", 43), ("s", 50)], "s knows 50 classes and r 43"),
        ([("r", 43, 16, None), ("s", 43, 20, None)], "synthetic signs are drawn anew"),
    ],
)
def test_a_committee_that_would_mean_nothing_is_refused_before_it_runs(runs, message):
    from cnn_jax import inference

    with pytest.raises(UserError, match=message):
        inference.evaluate_committee([_stub_run(*run) for run in runs])


def test_a_committee_of_synthetic_runs_of_one_size_passes_its_checks():
    from cnn_jax import inference

    # A run's num_classes None is the synthetic set's 43.
    runs = [_stub_run("r", data=None), _stub_run("s", data=None, config_classes=43)]
    inference._check_committee(runs, own_split=True)
