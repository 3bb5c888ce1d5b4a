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
import optax
from flax import nnx

from cnn_jax import backend, parallel
from cnn_jax import data as data_lib
from cnn_jax.config import Config
from cnn_jax.models import create_model
from cnn_jax.optim import create_optimizer
from cnn_jax.predictor import TRACE_COUNTS, Predictor, batch_of, compile_fn

# The seed's independent random streams, as big_vision splits its seed: the initial weights,
# dropout, and a slot for data augmentation. One key drawn from the seed would give the k-th
# initialisation key and step k's dropout key the same value (both fold k into it).
STREAMS = ("init", "dropout", "augment")


def stream_key(seed, name: str) -> jax.Array:
    """The key of one of the seed's STREAMS (works on traced seeds too)."""
    return jax.random.split(jax.random.key(seed), len(STREAMS))[STREAMS.index(name)]


def dropout_key(seed, step) -> jax.Array:
    """Step `step`'s dropout key: from the seed and the global step, so a resume needs no state."""
    return jax.random.fold_in(stream_key(seed, "dropout"), step)


class TrainState(NamedTuple):
    params: Any  # nnx.State of the model's Params
    opt_state: Any
    step: jax.Array  # int32, steps taken since the start of training
    metrics: jax.Array  # float32[3]: sum of loss, correct predictions, images, this epoch


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean categorical cross-entropy on logits (Keras: softmax + crossentropy)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


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

    @functools.cached_property
    def predictor(self) -> Predictor:
        """The same network for inference and evaluation (it may use another convolution)."""
        return Predictor(
            self.infer_graphdef or self.graphdef, self.pixels, self.mesh, self.precision
        )

    def place(self, tree):
        """Copies arrays (a state, a data set) onto every device of the mesh."""
        return self.predictor.place(tree)

    def apply(self, params, images, dropout_key=None):
        """Float32 training logits of uint8 images (bf16 models compute in bf16, the loss not)."""
        x = data_lib.scale_pixels(images, self.pixels)
        logits = nnx.merge(self.graphdef, params)(x, dropout_key=dropout_key)
        return logits.astype(jnp.float32)

    def init_state(self, params) -> TrainState:
        return TrainState(
            params, self.tx.init(params), jnp.zeros([], jnp.int32), jnp.zeros(3, jnp.float32)
        )

    def _compiled(self, fn, **jit_options):
        return compile_fn(fn, self.mesh, self.precision, **jit_options)

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

    def _train_step(self, state, images, labels, order, n, i, seed):
        TRACE_COUNTS["train_step"] += 1
        idx, weights = batch_of(order, i, self.batch_size, n)
        # Each device computes its slice of the batch; XLA sums the gradients across devices.
        x, y, weights = self.predictor.shard(images[idx], labels[idx], weights)
        key = dropout_key(seed, state.step)

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


def _network(config: Config, num_classes: int):
    """The mesh of the config's devices, and a builder of its model for a convolution choice.

    Shared by training (which initialises the weights) and restoring (which needs only shapes).
    """
    platform = backend.resolve_platform(config.platform)
    mesh = parallel.create_mesh(config.devices, platform)

    def build(conv: str, seed=0):
        return create_model(
            config.model,
            config.image_size,
            num_classes,
            seed=seed,
            dropout=config.dropout,
            conv=conv,
            dtype=config.dtype,
            platform=platform,
        )

    return platform, mesh, build


def _inference_conv(config: Config) -> str:
    # With 'auto', inference uses XLA's own convolution: on CPU its forward pass beat the
    # matmul form (11k vs 4-9k images/s, BENCHMARKS.md); only its gradient is slow there.
    return "lax" if config.conv == "auto" else config.conv


def abstract_state(config: Config, num_classes: int) -> tuple[Predictor, TrainState]:
    """The inference network for a config, and the shapes of its training state (a restore
    template: nothing is initialised or allocated)."""
    _, mesh, build = _network(config, num_classes)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build(_inference_conv(config))))
    tx = create_optimizer(config.optimizer, config.learning_rate)
    state = TrainState(
        params,
        jax.eval_shape(tx.init, params),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((3,), jnp.float32),
    )
    precision = backend.matmul_precision(config.precision)
    return Predictor(graphdef, config.pixels, mesh, precision), state


def create_trainer(config: Config, num_classes: int, steps_per_epoch: int = 1):
    """The Trainer and the initial state for a config.

    `steps_per_epoch` sizes `--steps-per-call auto` (backend.steps_per_call).
    """
    platform, mesh, build = _network(config, num_classes)
    parallel.check_batch(config.batch_size, mesh)
    graphdef, params = nnx.split(build(config.conv, stream_key(config.seed, "init")))
    infer_conv = _inference_conv(config)
    # Another formulation for inference needs only its graph: no second set of weights.
    infer_graphdef = (
        graphdef
        if infer_conv == config.conv
        else nnx.split(nnx.eval_shape(lambda: build(infer_conv)))[0]
    )
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
