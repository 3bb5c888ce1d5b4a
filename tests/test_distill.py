"""`--distill-from RUN`: training on a teacher's probabilities instead of the labels."""

import jax
import numpy as np
import optax
import pytest

from cnn_jax import data as data_lib
from cnn_jax.cli import main
from cnn_jax.config import Config
from cnn_jax.distill import teacher_targets
from cnn_jax.inference import load_checkpoint, probabilities
from cnn_jax.steps import create_trainer, cross_entropy
from cnn_jax.train import fit

_SMALL = ["--synthetic-per-class", "6", "--platform", "cpu", "--quiet"]


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
