"""The training state and the jit-compiled train and eval steps, and evaluation over a set.

No I/O here. The training state is a plain pytree (params, optimizer state, step, running
metrics) so that it can be donated to the compiled step, checkpointed and restored on any device
count. The data set lives on the device once; each step slices its batch out of a per-epoch
permutation, so the host sends only a step number per step.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cnn_jax import backend, parallel
from cnn_jax import data as data_lib
from cnn_jax.config import Config
from cnn_jax.models import create_model
from cnn_jax.optim import create_optimizer


def ceil_div(a: int, b: int) -> int:
    """Batches of b needed for a items, the last one partial."""
    return -(-a // b)


# Smaller batches ran faster than 1000 on a 2-core CPU (cache-sized activations).
EVAL_BATCH = 256
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


def padded_order(order: np.ndarray, batch_size: int) -> np.ndarray:
    pad = -len(order) % batch_size
    return np.concatenate([order, np.zeros(pad, order.dtype)]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled steps for one model, optimizer and pixel scaling."""

    graphdef: Any
    tx: optax.GradientTransformation
    pixels: str
    batch_size: int
    mesh: Any  # jax.sharding.Mesh with a 'data' axis
    steps_per_call: int = 1  # training steps per compiled call (a lax.scan when > 1)
    # The same network for inference; it may use another convolution formulation.
    infer_graphdef: Any = None
    precision: str | None = None  # jax.default_matmul_precision while tracing; None: JAX's

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform

    @property
    def eval_batch(self) -> int:
        """EVAL_BATCH rounded up to a multiple of the device count."""
        return ceil_div(EVAL_BATCH, self.mesh.size) * self.mesh.size

    def place(self, tree):
        """Copies arrays (a state, a data set) onto every device of the mesh."""
        return jax.device_put(tree, parallel.replicated(self.mesh))

    def _shard(self, *arrays):
        # Each device computes its slice of the batch; XLA sums the gradients across devices.
        return [jax.lax.with_sharding_constraint(a, parallel.sharded(self.mesh)) for a in arrays]

    def apply(self, params, images, dropout_key=None, *, inference: bool = False):
        """Float32 logits of uint8 images (bf16 models compute in bf16; the loss does not)."""
        x = data_lib.scale_pixels(images, self.pixels)
        graphdef = self.infer_graphdef if inference and self.infer_graphdef else self.graphdef
        logits = nnx.merge(graphdef, params)(x, dropout_key=dropout_key)
        return logits.astype(jnp.float32)

    def init_state(self, params) -> TrainState:
        return TrainState(
            params, self.tx.init(params), jnp.zeros([], jnp.int32), jnp.zeros(3, jnp.float32)
        )

    def _jit(self, fn, **jit_options):
        """jax.jit of `fn`, traced under the configured matmul precision.

        The precision is written into each product when traced, so the gradient's products
        carry it too.
        """

        @functools.wraps(fn)
        def traced(*args):
            with jax.default_matmul_precision(self.precision):
                return fn(*args)

        return jax.jit(traced if self.precision else fn, **jit_options)

    def _compiled(self, fn, **jit_options):
        compiled = self._jit(fn, **jit_options)
        if self.mesh.size == 1 or self.platform != "cpu":
            return compiled
        # Several CPU devices share one thread pool: with a few multi-device calls queued,
        # an all-reduce could wait for device threads that never ran, and XLA aborted the
        # process after 40 s (seen with 8 simulated devices on 2 cores). One call at a time.
        return lambda *args: jax.block_until_ready(compiled(*args))

    @functools.cached_property
    def train_step(self):
        # The state is donated: its buffers are reused for the new state instead of copied.
        return self._compiled(self._train_step, donate_argnums=0)

    @functools.cached_property
    def train_steps(self):
        """`steps_per_call` steps in one compiled call; steps past the epoch's end change nothing.

        One call per many steps takes Python and the dispatch out of the loop, which is what
        makes small steps fast on an accelerator. The state is donated as in `train_step`.
        Steps past the end are computed and dropped with a select rather than skipped with
        `lax.cond`, whose predicate XLA:GPU may read back to the host on every step (a sync),
        and `backend.steps_per_call` sizes calls so that only resumed epochs have such steps.
        """

        def run(state, images, labels, order, n, start, seed):
            steps = (n + self.batch_size - 1) // self.batch_size

            def body(state, k):
                i = start + k
                new = self._train_step(state, images, labels, order, n, i, seed)
                keep = lambda a, b: jnp.where(i < steps, a, b)  # noqa: E731
                return jax.tree.map(keep, new, state), None

            return jax.lax.scan(body, state, jnp.arange(self.steps_per_call))[0]

        return self._compiled(run, donate_argnums=0)

    @functools.cached_property
    def eval_step(self):
        return self._compiled(self._eval_step)

    def _train_step(self, state, images, labels, order, n, i, dropout_seed):
        TRACE_COUNTS["train_step"] += 1
        idx, weights = _batch(order, i, self.batch_size, n)
        x, y, weights = self._shard(images[idx], labels[idx], weights)
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
        idx, weights = _batch(order, i, self.eval_batch, n)
        x, y, weights = self._shard(images[idx], labels[idx], weights)
        logits = self.apply(params, x, inference=True)
        predictions = jnp.argmax(logits, -1)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        sums = jnp.stack(
            [jnp.sum(losses * weights), jnp.sum((predictions == y) * weights), jnp.sum(weights)]
        )
        return sums, predictions

    @functools.cached_property
    def probabilities(self):
        """Softmax outputs for a batch of uint8 images, as Keras' `predict` gives them."""
        return self._jit(
            lambda params, images: jax.nn.softmax(self.apply(params, images, inference=True))
        )


def create_trainer(config: Config, num_classes: int, steps_per_epoch: int = 1):
    """The Trainer and the initial state for a config.

    `steps_per_epoch` sizes `--steps-per-call auto` (backend.steps_per_call).
    """
    platform = backend.resolve_platform(config.platform)
    mesh = parallel.create_mesh(config.devices, platform)
    parallel.check_batch(config.batch_size, mesh)

    def build(conv):
        return create_model(
            config.model,
            config.image_size,
            num_classes,
            seed=config.seed,
            dropout=config.dropout,
            conv=conv,
            dtype=config.dtype,
            platform=platform,
        )

    graphdef, params = nnx.split(build(config.conv))
    # With 'auto', inference uses XLA's own convolution: on CPU its forward pass beat the
    # matmul form (11k vs 4-9k images/s, BENCHMARKS.md); only its gradient is slow there.
    infer_graphdef = nnx.split(build("lax"))[0] if config.conv == "auto" else graphdef
    tx = create_optimizer(config.optimizer, config.learning_rate)
    per_call = backend.steps_per_call(
        config.steps_per_call, platform, steps_per_epoch, config.batch_size
    )
    trainer = Trainer(
        graphdef,
        tx,
        config.pixels,
        config.batch_size,
        mesh,
        per_call,
        infer_graphdef,
        backend.matmul_precision(config.precision),
    )
    return trainer, trainer.place(trainer.init_state(params))


def evaluate(trainer: Trainer, params, images, labels) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and predictions over a whole set, in padded batches."""
    n = len(labels)
    order, images, labels_dev = trainer.place(
        (padded_order(np.arange(n), trainer.eval_batch), images, labels)
    )
    outputs = [
        trainer.eval_step(params, images, labels_dev, order, n, i)
        for i in range(ceil_div(n, trainer.eval_batch))
    ]
    loss, correct, count = np.sum([np.asarray(sums) for sums, _ in outputs], axis=0)
    predictions = np.concatenate([np.asarray(p) for _, p in outputs])[:n]
    labels = np.asarray(labels)
    per_class = {int(c): float(np.mean(predictions[labels == c] == c)) for c in np.unique(labels)}
    return {
        "loss": float(loss / count),
        "accuracy": float(correct / count),
        "n": int(count),
        "per_class_accuracy": per_class,
        "predictions": predictions,
    }
