"""Distillation: a network trained on a teacher's probabilities instead of the labels.

An ensemble's averaged probabilities say which classes an image resembles ("80 km/h, a little
like 30 km/h"); a single network trained on them keeps much of the ensemble's accuracy at one
network's cost, and exports as one. The targets are the teacher's outputs for each training
image as it is, computed once; augmentation then changes what the student sees, not what it
aims for. With --distill-views the teacher classifies each augmented image in the training step
instead (Trainer.teacher), so that student and teacher see the same view: Beyer et al., "Knowledge
distillation: A good teacher is patient and consistent" (CVPR 2022), found fixed targets on
unaugmented images the weaker of the two. Several --distill-from runs are a committee (runs
trained apart, with other pixels or options, as `evaluate --average-with` judges them): the
targets are their probabilities averaged, each run classifying the images its own way.
"""

import numpy as np

from cnn_jax.config import Config
from cnn_jax.data import Dataset, split_run
from cnn_jax.errors import UserError


def teacher_targets(config: Config, dataset: Dataset, indices, num_classes: int) -> np.ndarray:
    """The teacher runs' float32 probabilities for the training images, averaged over the
    runs, (n_train, classes)."""
    from cnn_jax import inference

    images = dataset.images[indices[0]]
    # One run at a time (each freed before the next loads): a committee's runs need not fit
    # in memory together, their probabilities do.
    each = [inference.probabilities(load_teacher(config, dataset, indices, num_classes, path),
                                    images) for path in config.distill_from]  # fmt: skip
    return np.mean(each, axis=0, dtype=np.float64).astype(np.float32)


def load_teacher(config: Config, dataset: Dataset, indices, num_classes: int, path):
    """The teacher run at `path` restored for inference (inference.Restored).

    Refused unless the teacher saw the same images at the same size and left every image of
    this run's validation and test splits out of its own training: a teacher that learnt the
    test images would carry them into the student's figures.
    """
    from cnn_jax import inference  # JAX and the checkpoint library: only when distilling
    from cnn_jax.run_store import data_fingerprint

    teacher = inference.load_checkpoint(path, config.platform)
    _check_same_inputs(config, teacher, num_classes, path)
    fingerprint = teacher.meta.data_fingerprint
    if fingerprint is not None and fingerprint != data_fingerprint(dataset):
        raise UserError(
            f"{path} was trained on other images (its data's fingerprint differs): a teacher "
            "must have seen this run's data"
        )
    teacher_train, _, _ = split_run(teacher.config, dataset)
    train, val, test = indices
    seen = np.isin(np.concatenate([val, test]), teacher_train)
    if seen.any():
        raise UserError(
            f"{path} trained on {int(seen.sum())} images of this run's validation and test "
            "splits: give this run the teacher's --split, --test-size, --val-size and --seed"
        )
    return teacher


def _check_same_inputs(config: Config, teacher, num_classes: int, path) -> None:
    t = teacher.config
    for name in ("image_size", "decoder"):
        if getattr(t, name) != getattr(config, name):
            raise UserError(
                f"{path} was trained with {name} {getattr(t, name)}, this run has "
                f"{getattr(config, name)}: a teacher must see the images as the student does"
            )
    if teacher.meta.num_classes != num_classes:
        raise UserError(f"{path} knows {teacher.meta.num_classes} classes, this run {num_classes}")
