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

from cnn_jax import augment as augment_lib
from cnn_jax import backend, parallel
from cnn_jax import cutmix as cutmix_lib
from cnn_jax import data as data_lib
from cnn_jax import mirror as mirror_lib
from cnn_jax.config import Config
from cnn_jax.errors import UserError
from cnn_jax.models import create_model, trains_with_onednn
from cnn_jax.optim import create_optimizer
from cnn_jax.predictor import TRACE_COUNTS, Predictor, batch_of, compile_fn, for_each_member

# The seed's independent random streams, as big_vision splits its seed: the initial weights,
# dropout, and a slot for data augmentation. One key drawn from the seed would give the k-th
# initialisation key and step k's dropout key the same value (both fold k into it).
STREAMS = ("init", "dropout", "augment")


def stream_key(seed, name: str) -> jax.Array:
    """The key of one of the seed's STREAMS (works on traced seeds too)."""
    return jax.random.split(jax.random.key(seed), len(STREAMS))[STREAMS.index(name)]


def step_key(seed, name: str, step) -> jax.Array:
    """Step `step`'s key of a stream: from the seed and the global step, so a resume needs no
    state."""
    return jax.random.fold_in(stream_key(seed, name), step)


def dropout_key(seed, step) -> jax.Array:
    return step_key(seed, "dropout", step)


def member_seeds(config: Config):
    """The seed each network trains from: the run's, or seed..seed+N-1 for an ensemble of N."""
    if config.ensemble == 1:
        return config.seed
    return np.arange(config.seed, config.seed + config.ensemble, dtype=np.int32)


class TrainState(NamedTuple):
    """One network's training state, or an ensemble's with a leading member axis on each."""

    params: Any  # nnx.State of the model's Params
    opt_state: Any
    step: jax.Array  # int32, steps taken since the start of training
    # float32[3] (ensembles: [members, 3]): the epoch's sums of loss, correct predictions and
    # images, in that order; report.EpochSums reads them by name
    metrics: jax.Array
    # nnx.State of the running batch-norm statistics; empty for Models 1 and 2
    batch_stats: Any = None
    # With --ema: the moving average of `last_weights` (nnx.State), the run's model; else None
    ema: Any = None

    @property
    def last_weights(self):
        """The last step's parameters and running statistics, as one nnx.State."""
        return nnx.merge_state(self.params, self.batch_stats)

    @property
    def weights(self):
        """What inference needs: the moving average with --ema, else `last_weights`."""
        return self.last_weights if self.ema is None else self.ema


def moving_average(average, weights, decay: float, step):
    """One step of an exponential moving average of the weights. The decay starts small
    ((1 + step) / (10 + step), as TensorFlow's ExponentialMovingAverage with num_updates), so
    that the initial weights do not linger in a short run."""
    step = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda a, w: a + (1.0 - d) * (w - a), average, weights)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    smoothing: float = 0.0,
    targets=None,
    mix=None,
) -> jax.Array:
    """Weighted mean categorical cross-entropy on logits (Keras: softmax + crossentropy), with
    `smoothing` of the one-hot targets spread evenly over the classes; given `targets`
    (probabilities per class: a teacher's), against them instead of the labels. `mix`, from
    `cutmix.cutmix`, mixes each image's targets with its partner's."""
    if targets is None and (smoothing or mix is not None):
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    if mix is not None:
        targets = cutmix_lib.mixed_targets(targets, *mix)
    if targets is not None:
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)  # many fields: named, never by position
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
    augment: augment_lib.Strengths | None = None  # None: train on the images as they are
    label_smoothing: float = 0.0
    members: int = 0  # an ensemble's size; 0: one network, no member axis
    deterministic: bool = True  # XLA's deterministic GPU ops (backend.compiler_options)
    # --distill-views: the teacher network, which classifies each augmented batch in the step;
    # its weights come in the targets' place (distill.py)
    teacher: Predictor | None = None
    ema: float = 0.0  # --ema: the decay of the weights' moving average; 0: none
    sam: float = 0.0  # --sam: how far the gradient is taken from the weights; 0: at them
    onednn: bool = False  # its convolutions are oneDNN's (metrics.json says so)

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform

    @functools.cached_property
    def predictor(self) -> Predictor:
        """The same network for inference and evaluation (it may use another convolution)."""
        return Predictor(
            self.infer_graphdef or self.graphdef,
            self.pixels,
            self.mesh,
            self.precision,
            self.members,
        )

    def place(self, tree):
        """Copies arrays (a state, a data set) onto every device of the mesh."""
        return self.predictor.place(tree)

    def apply(self, params, images, dropout_key=None, batch_stats=None, mask=None):
        """Float32 training logits of one network for uint8 (or 0..255 float) images (bf16
        models compute in bf16, the loss not), and its batch statistics after the call;
        `mask` marks the rows that are images rather than padding."""
        x = data_lib.scale_pixels(images, self.pixels)
        model = nnx.merge(self.graphdef, params, *([batch_stats] if batch_stats else []))
        logits = model(x, dropout_key=dropout_key, mask=mask).astype(jnp.float32)
        return logits, nnx.state(model, nnx.BatchStat)

    def init_state(self, params, batch_stats=None) -> TrainState:
        """The state before the first step; with `members`, params have a member axis."""

        def init(params, batch_stats):
            zero = jnp.zeros([], jnp.int32)
            state = TrainState(params, self.tx.init(params), zero, jnp.zeros(3), batch_stats)
            # a copy: the step donates the state, and no buffer may be donated twice
            ema = jax.tree.map(jnp.copy, state.last_weights) if self.ema else None
            return state._replace(ema=ema)

        batch_stats = nnx.State({}) if batch_stats is None else batch_stats
        return jax.vmap(init)(params, batch_stats) if self.members else init(params, batch_stats)

    def _compiled(self, fn, **jit_options):
        return compile_fn(fn, self.mesh, self.precision, self.deterministic, **jit_options)

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
        # A distilled run's labels come with its teacher's probabilities (distill.py).
        labels, targets = labels if isinstance(labels, tuple) else (labels, None)
        # Each device computes its slice of the batch; XLA sums the gradients across devices.
        x, y, weights = self.predictor.shard(images[idx], labels[idx], weights)
        if targets is not None and self.teacher is None:
            (targets,) = self.predictor.shard(targets[idx])
        if self.members:  # every member on the same batch, each from its own seed
            step = lambda s, k: self._member_step(s, x, y, weights, k, targets)  # noqa: E731
            return for_each_member(self.platform, step, state, seed, unroll=not self.onednn)
        return self._member_step(state, x, y, weights, seed, targets)

    def _augmented(self, key, x, y, targets):
        """The batch changed at random: first mirrored (`--aug-flip`, which may change a label
        and so the teacher's probabilities), then the rest of `augment`."""
        if self.augment.flip:
            mirror_key = jax.random.fold_in(key, mirror_lib.MIRROR_TAG)
            if self.teacher is None:
                x, y, targets = mirror_lib.mirror(mirror_key, x, y, self.augment.flip, targets)
            else:  # `targets` holds the teacher's weights; it grades the mirrored batch itself
                x, y, _ = mirror_lib.mirror(mirror_key, x, y, self.augment.flip)
        return augment_lib.augment(key, x, self.augment), y, targets

    def _member_step(self, state, x, y, weights, seed, targets=None):
        """One network's update on a batch; `seed` draws its dropout and augmentation. `targets`:
        a teacher's probabilities for the batch, or with `teacher` its weights."""
        mix = None
        if self.augment is not None:
            augment_key = step_key(seed, "augment", state.step)
            x, y, targets = self._augmented(augment_key, x, y, targets)
            if self.augment.cutmix:
                mix_key = jax.random.fold_in(augment_key, cutmix_lib.CUTMIX_TAG)
                x, *mix = cutmix_lib.cutmix(mix_key, x, weights, self.augment.cutmix)
                (x,) = self.predictor.shard(x)  # the pastes came from across the batch
        if self.teacher is not None:  # `targets` holds its weights: it sees what the student does
            targets, mix = self.teacher.mean_probabilities(targets, x), None  # graded as mixed
        key = dropout_key(seed, state.step)

        # The statistics go in as an argument: NNX updates them only inside the trace that
        # made them (and their gradient, zero, costs nothing).
        def loss_fn(params, batch_stats):
            logits, batch_stats = self.apply(params, x, key, batch_stats, weights > 0)
            loss = cross_entropy(logits, y, weights, self.label_smoothing, targets, mix)
            return loss, (logits, batch_stats)

        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (loss, (logits, batch_stats)), (grads, _) = grad_fn(state.params, state.batch_stats)
        if self.sam:
            grads = _sharpness_aware(grad_fn, state, grads, self.sam)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum((jnp.argmax(logits, -1) == y) * weights)
        count = jnp.sum(weights)
        metrics = state.metrics + jnp.stack([loss * count, correct, count])
        new = TrainState(params, opt_state, state.step + 1, metrics, batch_stats)
        if state.ema is None:
            return new
        return new._replace(ema=moving_average(state.ema, new.last_weights, self.ema, state.step))


def _network(config: Config, num_classes: int):
    """The mesh of the config's devices, and a builder of its model for a convolution choice
    (`looped`: it trains in a compiled loop of steps, models.create_model).

    Shared by training (which initialises the weights) and restoring (which needs only shapes).
    """
    platform = backend.resolve_platform(config.platform)
    mesh = parallel.create_mesh(config.devices, platform)

    def build(conv: str, seed=0, looped=False):
        return create_model(
            config.model,
            config.image_size,
            num_classes,
            seed=seed,
            dropout=config.dropout,
            conv=conv,
            dtype=config.dtype,
            platform=platform,
            stn=config.stn,
            width=config.width,
            looped=looped,
            devices=mesh.size,
        )

    return platform, mesh, build


def _inference_conv(config: Config) -> str:
    # With 'auto', inference uses XLA's own convolution: on CPU its forward pass beat the
    # matmul form (11k vs 4-9k images/s, BENCHMARKS.md); only its gradient is slow there.
    # oneDNN's too: a restored network then classifies and exports anywhere, with no FFI call.
    return "lax" if config.conv in ("auto", "onednn") else config.conv


def _initial_weights(config: Config, build, conv: str):
    """(graphdef, params, batch_stats) from the seed's init stream; an ensemble's members are
    stacked on a leading axis, each from its own seed."""

    def weights(seed):
        return nnx.split(build(conv, stream_key(seed, "init")), nnx.Param, nnx.BatchStat)[1:]

    graphdef = nnx.split(nnx.eval_shape(lambda: build(conv)))[0]
    seeds = member_seeds(config)
    params, batch_stats = jax.vmap(weights)(seeds) if config.ensemble > 1 else weights(seeds)
    return graphdef, params, batch_stats


def _sharpness_aware(grad_fn, state: TrainState, grads, rho: float):
    """SAM's gradient: the batch's gradient at the weights `rho` up its own (normalised)
    direction, the worst weights that near to first order; loss, accuracy and batch-norm
    statistics stay those at the weights themselves. Written out rather than optax.contrib.sam,
    whose opaque mode wants a gradient function without the statistics NNX threads through."""
    scale = rho / (optax.tree.norm(grads) + 1e-12)
    nearby = jax.tree.map(lambda w, g: w + scale * g, state.params, grads)
    _, (sharp, _) = grad_fn(nearby, state.batch_stats)
    return sharp


def _trainer(config: Config, tx, mesh, graphdef, infer_graphdef, per_call=1) -> Trainer:
    return Trainer(
        graphdef=graphdef,
        tx=tx,
        pixels=config.pixels,
        batch_size=config.batch_size,
        mesh=mesh,
        steps_per_call=per_call,
        infer_graphdef=infer_graphdef,
        precision=backend.matmul_precision(config.precision),
        augment=config.strengths if config.augment else None,
        label_smoothing=config.label_smoothing,
        members=config.ensemble if config.ensemble > 1 else 0,
        deterministic=config.deterministic,
        ema=config.ema,
        sam=config.sam,
        onednn=trains_with_onednn(
            config.model, config.conv, config.dtype, mesh.devices.flat[0].platform, mesh.size
        ),
    )


def abstract_state(config: Config, num_classes: int) -> tuple[Predictor, TrainState]:
    """The inference network for a config, and the shapes of its training state (a restore
    template: nothing is initialised or allocated)."""
    _, mesh, build = _network(config, num_classes)
    conv = _inference_conv(config)
    graphdef = nnx.split(nnx.eval_shape(lambda: build(conv)))[0]
    trainer = _trainer(config, create_optimizer(config), mesh, graphdef, graphdef)

    def initial():
        _, params, batch_stats = _initial_weights(config, build, conv)
        return trainer.init_state(params, batch_stats)

    return trainer.predictor, jax.eval_shape(initial)


def create_trainer(config: Config, num_classes: int, steps_per_epoch: int = 1):
    """The Trainer and the initial state for a config.

    `steps_per_epoch` sizes `--steps-per-call auto` (backend.steps_per_call) and the schedule.
    """
    platform, mesh, build = _network(config, num_classes)
    if config.conv == "onednn" and mesh.size > 1:  # a restored one classifies anywhere
        raise UserError(
            f"--conv onednn trains on one device, not {mesh.size} (--devices, "
            "JAX_NUM_CPU_DEVICES or several processes): give --devices 1, or --conv auto"
        )
    per_call = backend.steps_per_call(
        config.steps_per_call, platform, steps_per_epoch, config.batch_size
    )
    build = functools.partial(build, looped=per_call > 1)
    parallel.check_batch(config.batch_size, mesh)
    graphdef, params, batch_stats = _initial_weights(config, build, config.conv)
    infer_conv = _inference_conv(config)
    # Another formulation for inference needs only its graph: no second set of weights.
    infer_graphdef = (
        graphdef
        if infer_conv == config.conv
        else nnx.split(nnx.eval_shape(lambda: build(infer_conv)))[0]
    )
    tx = create_optimizer(config, steps_per_epoch)
    trainer = _trainer(config, tx, mesh, graphdef, infer_graphdef, per_call)
    return trainer, trainer.place(trainer.init_state(params, batch_stats))
