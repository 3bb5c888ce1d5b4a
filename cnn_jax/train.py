"""Loss, jit-compiled train and eval steps, the epoch loop and `fit`.

The training state is a plain pytree (params, optimizer state, step, running metrics) so that
it can be donated to the compiled step, checkpointed and restored on any device count. The data
set lives on the device once; each step slices its batch out of a per-epoch permutation, so
the host sends only a step number per step.
"""

import dataclasses
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cnn_jax import data as data_lib
from cnn_jax.config import Config
from cnn_jax.models import count_params, create_model
from cnn_jax.optim import create_optimizer
from cnn_jax.report import Progress

EVAL_BATCH = 1000
# How often each compiled function has been traced; tests read it to prove there is no retracing.
TRACE_COUNTS = {"train_step": 0, "eval_step": 0}


class TrainState(NamedTuple):
    params: Any  # nnx.State of the model's Params
    opt_state: Any
    step: jax.Array  # int32, steps taken since the start of training
    metrics: jax.Array  # float32[3]: sum of loss, correct predictions, images, this epoch


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean categorical cross-entropy on logits (Keras: softmax + crossentropy)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _batch(order: jax.Array, i: jax.Array, batch_size: int, n: int):
    """Indices of batch i of a padded order, and 1/0 weights that mask the padding.

    The last batch of an epoch is partial (Keras trains on it too); padding it keeps one
    compiled shape for every step.
    """
    idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
    weights = (i * batch_size + jnp.arange(batch_size) < n).astype(jnp.float32)
    return idx, weights


def _padded(order: np.ndarray, batch_size: int) -> np.ndarray:
    pad = -len(order) % batch_size
    return np.concatenate([order, np.zeros(pad, order.dtype)]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled steps for one model, optimizer and pixel scaling."""

    graphdef: Any
    tx: optax.GradientTransformation
    pixels: str
    batch_size: int

    def apply(self, params, images: jax.Array, dropout_key: jax.Array | None = None):
        x = data_lib.scale_pixels(images, self.pixels)
        return nnx.merge(self.graphdef, params)(x, dropout_key=dropout_key)

    def init_state(self, params) -> TrainState:
        return TrainState(
            params, self.tx.init(params), jnp.zeros([], jnp.int32), jnp.zeros(3, jnp.float32)
        )

    @functools.cached_property
    def train_step(self):
        # The state is donated: its buffers are reused for the new state instead of copied.
        return jax.jit(self._train_step, donate_argnums=0)

    @functools.cached_property
    def eval_step(self):
        return jax.jit(self._eval_step)

    def _train_step(self, state, images, labels, order, n, i, dropout_seed):
        TRACE_COUNTS["train_step"] += 1
        idx, weights = _batch(order, i, self.batch_size, n)
        x, y = images[idx], labels[idx]
        # One key per step, from the seed and the global step: resuming needs no RNG state.
        key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)

        def loss_fn(params):
            logits = self.apply(params, x, key)
            return cross_entropy(logits, y, weights), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum((jnp.argmax(logits, -1) == y) * weights)
        count = jnp.sum(weights)
        metrics = state.metrics + jnp.stack([loss * count, correct, count])
        return TrainState(params, opt_state, state.step + 1, metrics)

    def _eval_step(self, params, images, labels, order, n, i):
        TRACE_COUNTS["eval_step"] += 1
        idx, weights = _batch(order, i, EVAL_BATCH, n)
        logits = self.apply(params, images[idx])
        y = labels[idx]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.stack(
            [
                jnp.sum(losses * weights),
                jnp.sum((jnp.argmax(logits, -1) == y) * weights),
                jnp.sum(weights),
            ]
        )


def create_trainer(config: Config, num_classes: int):
    """The Trainer and the initial state for a config."""
    model = create_model(config.model, config.image_size, num_classes, seed=config.seed)
    graphdef, params = nnx.split(model)
    tx = create_optimizer(config.optimizer, config.learning_rate)
    trainer = Trainer(graphdef, tx, config.pixels, config.batch_size)
    return trainer, trainer.init_state(params)


def evaluate(trainer: Trainer, params, images, labels) -> dict[str, Any]:
    """Loss, accuracy and per-class accuracy over a whole set, in fixed-size padded batches."""
    n = len(labels)
    order = jnp.asarray(_padded(np.arange(n), EVAL_BATCH))
    images, labels_dev = jnp.asarray(images), jnp.asarray(labels)
    totals = [
        trainer.eval_step(params, images, labels_dev, order, n, i)
        for i in range(-(-n // EVAL_BATCH))
    ]
    loss, correct, count = np.sum(np.asarray(totals), axis=0)
    return {"loss": float(loss / count), "accuracy": float(correct / count), "n": int(count)}


def train_epoch(trainer, state, images, labels, order, dropout_seed, progress=None):
    """One pass over `order`; returns the new state and each step's wall time in ms."""
    n = len(order)
    padded = jnp.asarray(_padded(order, trainer.batch_size))
    state = state._replace(metrics=jnp.zeros(3, jnp.float32))
    step_ms = []
    steps = -(-n // trainer.batch_size)
    t_last = time.perf_counter()
    for i in range(steps):
        state = trainer.train_step(state, images, labels, padded, n, i, dropout_seed)
        # Waiting each step costs little at this step size and makes the step times honest.
        state.metrics.block_until_ready()
        now = time.perf_counter()
        step_ms.append((now - t_last) * 1e3)
        t_last = now
        if progress is not None:
            progress.update(i + 1, state.metrics)
    return state, step_ms


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of an epoch: a seeded permutation, reproducible on resume."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def fit(config: Config, dataset: data_lib.Dataset, workdir: Path | None = None, verbose=True):
    """Splits the data, trains, evaluates on the test split; writes config and metrics JSON."""
    num_classes = config.num_classes or dataset.num_classes
    if dataset.num_classes > num_classes:
        raise ValueError(
            f"the data has class ids up to {dataset.num_classes - 1}, more than "
            f"--num-classes {num_classes}"
        )
    if config.batch_size < 1 or config.epochs < 0:
        raise ValueError("batch size must be at least 1 and epochs at least 0")
    train_idx, test_idx = data_lib.split_indices(
        dataset.labels, config.test_size, config.seed, config.split, dataset.paths
    )
    trainer, state = create_trainer(config, num_classes)
    images = jnp.asarray(dataset.images)
    labels = jnp.asarray(dataset.labels)
    train_images, train_labels = images[train_idx], labels[train_idx]
    metrics = {
        "model": config.model,
        "params": count_params(nnx.merge(trainer.graphdef, state.params)),
        "num_classes": num_classes,
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "skipped_files": [{"path": p, "reason": r} for p, r in dataset.skipped],
        "epochs": [],
    }
    if workdir is not None:
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        config.write(workdir / "config.json")
    all_step_ms = []
    dropout_seed = config.seed
    for epoch in range(config.epochs):
        order = epoch_order(config.seed, epoch, len(train_idx))
        progress = Progress(epoch, config.epochs, -(-len(order) // config.batch_size), verbose)
        t0 = time.perf_counter()
        state, step_ms = train_epoch(
            trainer, state, train_images, train_labels, order, dropout_seed, progress
        )
        loss_sum, correct, count = np.asarray(state.metrics)
        record = {
            "train_loss": float(loss_sum / count),
            "train_accuracy": float(correct / count),
            "seconds": time.perf_counter() - t0,
        }
        if config.eval_every_epoch:
            ev = evaluate(trainer, state.params, images[test_idx], labels[test_idx])
            record.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        progress.close(record)
        metrics["epochs"].append(record)
        all_step_ms += step_ms[1:] if epoch == 0 else step_ms  # the first step compiles
    ev = evaluate(trainer, state.params, images[test_idx], labels[test_idx])
    metrics.update(
        test_loss=ev["loss"],
        test_accuracy=ev["accuracy"],
        median_step_ms=statistics.median(all_step_ms) if all_step_ms else None,
    )
    if workdir is not None:
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return state, metrics
