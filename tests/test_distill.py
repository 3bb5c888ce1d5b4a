"""`--distill-from RUN`: training on a teacher's probabilities instead of the labels."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest
from numerics import SAME_FUNCTION, assert_same_function, relative

from cnn_jax import data as data_lib
from cnn_jax.cli import main
from cnn_jax.config import Config
from cnn_jax.distill import teacher_targets
from cnn_jax.inference import load_checkpoint, probabilities
from cnn_jax.steps import create_trainer, cross_entropy
from cnn_jax.train import fit

_SMALL = ["--synthetic-per-class", "6", "--platform", "cpu", "--quiet"]


pytestmark = pytest.mark.xdist_group("distill")  # module fixtures set up once (pyproject.toml)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher") / "run"
    args = ["train", "--epochs", "1", "--ensemble", "2", "--workdir", str(workdir), *_SMALL]
    assert main(args) == 0
    return workdir


def test_targets_that_are_the_labels_give_the_labels_loss():
    logits = jax.random.normal(jax.random.key(0), (5, 7))
    labels = np.array([0, 3, 6, 2, 2])
    weights = np.array([1.0, 1, 1, 1, 0])
    one_hot = jax.nn.one_hot(labels, 7)
    np.testing.assert_allclose(cross_entropy(logits, labels, weights, 0.0, one_hot),
                               cross_entropy(logits, labels, weights), rtol=1e-6)  # fmt: skip


def test_the_student_learns_each_image_from_the_teachers_probabilities_for_it(teacher):
    # One step over the whole training split, dropout off: the epoch's loss is the mean
    # cross-entropy of the initial network against the teacher's outputs, image by image
    # (a target paired with another image would give another loss).
    config = Config(epochs=1, synthetic_per_class=6, distill_from=str(teacher), batch_size=4096,
                    dropout=0.0, platform="cpu", devices=1)  # fmt: skip
    dataset = data_lib.load_configured(config)
    _, metrics = fit(config, dataset, verbose=False)
    train = data_lib.split_run(config, dataset)[0]
    restored = load_checkpoint(teacher, "cpu")
    targets = probabilities(restored, dataset.images[train])
    trainer, state = create_trainer(Config(**{**config.__dict__, "distill_from": None}), 43)
    logits, _ = trainer.apply(state.params, dataset.images[train])
    expected = float(np.mean(optax.softmax_cross_entropy(logits, targets)))
    assert metrics["epochs"][0]["train_loss"] == pytest.approx(expected, rel=1e-4)
    labels_loss = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, dataset.labels[train])))  # fmt: skip
    assert abs(expected - labels_loss) > 1e-3  # the targets are not the labels
    assert teacher_targets(config, dataset, data_lib.split_run(config, dataset), 43).shape == (
        len(train), 43)  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "1"], "images of this run's validation and test splits"),
        (["--image-size", "32"], "was trained with image_size 30, this run has 32"),
    ],
)
def test_a_teacher_that_saw_the_test_images_or_other_inputs_is_refused(teacher, capsys, args,
                                                                        message):  # fmt: skip
    assert main(["train", "--epochs", "1", "--distill-from", str(teacher), *_SMALL, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_every_teacher_of_a_committee_is_checked(teacher, tmp_path, capsys):
    other = tmp_path / "seed1"
    assert main(["train", "--epochs", "1", "--seed", "1", "--workdir", str(other), *_SMALL]) == 0
    two = ["--distill-from", str(teacher), "--distill-from", str(other)]
    assert main(["train", "--epochs", "1", *two, *_SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{other} trained on" in err
    assert main(["train", "--epochs", "1", *two[:2], *two[:2], *_SMALL]) == 2
    assert "names a run twice" in capsys.readouterr().err


def _gradient(trainer, images, labels, targets):
    """Minus the gradient of one step (SGD, learning rate 1) from the initial weights."""
    trainer, state = trainer
    trainer = dataclasses.replace(trainer, tx=optax.sgd(1.0))
    state = trainer.place(trainer.init_state(state.params))
    before = [np.asarray(p) for p in jax.tree.leaves(state.params)]
    x, y, order, t = trainer.place((images, labels, np.arange(len(labels)), targets))
    state = trainer.train_step(state, x, (y, t), order, len(labels), 0, 0)
    return np.concatenate([(np.asarray(p) - b).ravel()
                           for p, b in zip(jax.tree.leaves(state.params), before)])  # fmt: skip


def test_a_teacher_in_the_step_classifies_the_augmented_batch_the_student_sees(tiny):
    """--distill-views: the step with the teacher inside is the step with fixed targets that
    are the teacher's probabilities for the same augmented images, not for the images as they
    are (numerics.py: the same function, the teacher's pass traced into another program)."""
    from cnn_jax import augment
    from cnn_jax.steps import step_key

    config = Config(model=2, augment=True, dropout=0.0, platform="cpu", devices=1, batch_size=32)
    images, labels = tiny.images[:32], tiny.labels[:32]
    teacher, teacher_state = create_trainer(dataclasses.replace(config, seed=7), 43)
    weights = teacher_state.weights
    trainer, state = create_trainer(config, 43)
    inside = (dataclasses.replace(trainer, teacher=teacher.predictor), state)
    got = _gradient(inside, images, labels, weights)

    seen = augment.augment(step_key(0, "augment", 0), images.astype(np.float32), config.strengths)
    on_views = np.asarray(teacher.predictor.mean_probabilities(weights, seen))
    on_images = np.asarray(teacher.predictor.probabilities(weights, images))
    assert_same_function(got, _gradient((trainer, state), images, labels, on_views), "views")
    fixed = _gradient((trainer, state), images, labels, on_images)
    assert relative(got, fixed) > 10 * SAME_FUNCTION  # 0.054 when written


def test_distill_views_trains_and_needs_a_teacher(teacher, capsys):
    refused = {
        "--distill-views has no effect without --distill-from": ["--augment"],
        "--distill-views has no effect without --augment": ["--distill-from", str(teacher)],
    }
    for message, args in refused.items():
        assert main(["train", "--epochs", "1", "--distill-views", *args, *_SMALL]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    config = Config(epochs=1, synthetic_per_class=6, distill_from=str(teacher), augment=True,
                    distill_views=True, platform="cpu")  # fmt: skip
    _, metrics = fit(config, data_lib.load_configured(config), verbose=False)
    assert np.isfinite(metrics["epochs"][0]["train_loss"]) and metrics["test_accuracy"] >= 0


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A second run on the same split, trained apart with other pixels: a committee's member."""
    workdir = tmp_path_factory.mktemp("other") / "run"
    assert main(["train", "--epochs", "1", "--pixels", "standard", "--workdir", str(workdir),
                 *_SMALL]) == 0  # fmt: skip
    return workdir


def test_a_committee_teaches_its_runs_mean_probabilities(teacher, other_teacher, tmp_path):
    config = Config(synthetic_per_class=6, distill_from=(str(teacher), str(other_teacher)),
                    platform="cpu")  # fmt: skip
    dataset = data_lib.load_configured(config)
    indices = data_lib.split_run(config, dataset)
    each = [probabilities(load_checkpoint(run, "cpu"), dataset.images[indices[0]])
            for run in (teacher, other_teacher)]  # fmt: skip
    assert relative(each[0], each[1]) > 0.1  # two teachers that disagree: the mean is neither
    np.testing.assert_allclose(teacher_targets(config, dataset, indices, 43),
                               (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-7)  # fmt: skip
    # On the command line: the option repeated, both runs kept in the run's config.
    workdir = tmp_path / "student"
    args = ["train", "--epochs", "1", "--workdir", str(workdir), *_SMALL]
    assert main([*args, "--distill-from", str(teacher), "--distill-from", str(other_teacher)]) == 0
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["distill_from"] == [str(teacher), str(other_teacher)]


def test_one_teacher_as_runs_saved_it_and_distill_views_with_a_committee(teacher, other_teacher,
                                                                         capsys):  # fmt: skip
    assert Config(distill_from="runs/e2").distill_from == ("runs/e2",)  # saved before committees
    assert Config(distill_from=None).distill_from == ()
    two = ["--distill-from", str(teacher), "--distill-from", str(other_teacher)]
    assert main(["train", "--epochs", "1", "--augment", "--distill-views", *two, *_SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--distill-views takes one --distill-from run" in err
