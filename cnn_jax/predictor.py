"""A network ready for inference: its graph, the jitted forward pass and evaluation over a set.

No optimizer and no training state: `cnn-jax evaluate` and `predict` use this alone, and the
Trainer (steps.py) evaluates through one.
"""

import collections
import dataclasses
import functools
from contextlib import nullcontext
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cnn_jax import augment, backend, parallel
from cnn_jax import data as data_lib

# Smaller batches ran faster than 1000 on a 2-core CPU (cache-sized activations).
EVAL_BATCH = 256
# How often each compiled function has been traced; tests read it to prove there is no retracing.
TRACE_COUNTS = collections.Counter()


def for_each_member(platform: str, fn, *stacked, unroll: bool = False):
    """`fn` over an ensemble's members (the leading axis of `stacked`), results stacked.

    A vmap on accelerators, where the members compute side by side. On the CPU one member
    after the other, in a `lax.map` loop: vmapped, XLA:CPU's convolution becomes a grouped one
    (a 2-member Model 3 step took 10x one member's), and unrolled, XLA runs the members'
    operations side by side, so that one member's work on a core stalls another's convolution,
    which spreads over every core: two members' training step with oneDNN's convolutions took
    2.9x one network's, looped 2.1x; their inference 2.2x, looped 2.0x (BENCHMARKS.md).

    `unroll`: on the CPU unrolled instead, for training with XLA's convolutions, whose
    gradients took 60x longer in the loop (70x in a loop over a batch split between two CPU
    devices); unrolled, 1.5-2.05x. Compiling then grows with the members.
    """
    if platform != "cpu":
        return jax.vmap(fn)(*stacked)
    if not unroll:
        return jax.lax.map(lambda args: fn(*args), stacked)
    count = jax.tree.leaves(stacked)[0].shape[0]
    outs = [fn(*jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(count)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def ceil_div(a: int, b: int) -> int:
    """Batches of b needed for a items, the last one partial."""
    return -(-a // b)


def padded_order(order: np.ndarray, batch_size: int) -> np.ndarray:
    pad = -len(order) % batch_size
    return np.concatenate([order, np.zeros(pad, order.dtype)]).astype(np.int32)


def batch_of(order: jax.Array, i: jax.Array, batch_size: int, n: int):
    """Indices of batch i of a padded order, and 1/0 weights that mask the padding.

    The last batch of an epoch is partial (Keras trains on it too); padding it keeps one
    compiled shape for every step.
    """
    idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
    weights = (i * batch_size + jnp.arange(batch_size) < n).astype(jnp.float32)
    return idx, weights


def compile_fn(fn, mesh, precision: str | None = None, deterministic=True, **jit_options):
    """jax.jit of `fn`, traced under the matmul precision (None: JAX's default), compiled with
    XLA's deterministic GPU ops on or off (backend.compiler_options).

    The precision is written into each product when traced, so the gradient's products carry
    it too. On several CPU devices each call is waited for (see below).
    """
    if precision:
        inner = fn

        @functools.wraps(inner)
        def fn(*args):
            with jax.default_matmul_precision(precision):
                return inner(*args)

    platform = mesh.devices.flat[0].platform
    options = backend.compiler_options(platform, deterministic)
    compiled = jax.jit(fn, compiler_options=options or None, **jit_options)
    if mesh.size == 1 or platform != "cpu":
        return compiled
    # Several CPU devices share one thread pool: with a few multi-device calls queued,
    # an all-reduce could wait for device threads that never ran, and XLA aborted the
    # process after 40 s (seen with 8 simulated devices on 2 cores). One call at a time.

    def finished(*args):
        return jax.block_until_ready(compiled(*args))

    finished.lower = compiled.lower  # what XLA makes of it, for tests
    return finished


def _from_host(array: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


@dataclasses.dataclass(frozen=True)
class Predictor:
    """The inference network for one model and pixel scaling, on a device mesh.

    Its functions take the network's weights (parameters and any batch-norm statistics, one
    nnx.State); an ensemble's weights have a leading member axis, and its probabilities are the
    mean of the members'.
    """

    graphdef: Any
    pixels: str
    mesh: Any  # jax.sharding.Mesh with a 'data' axis
    precision: str | None = None  # jax.default_matmul_precision while tracing; None: JAX's
    members: int = 0  # an ensemble's size; 0: one network
    tta: int = 1  # views averaged per image: 1 is the image alone, N adds N-1 changed copies

    @property
    def eval_batch(self) -> int:
        """EVAL_BATCH rounded up to a multiple of the device count."""
        return ceil_div(EVAL_BATCH, self.mesh.size) * self.mesh.size

    def place(self, tree):
        """Copies arrays (parameters, a data set) onto every device of the mesh. Across
        processes each places its own devices' copies from its host memory: device_put would
        first check that every process holds the same values (3.4 s for a GTSRB-sized set)."""
        sharding = parallel.replicated(self.mesh)
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)
        return jax.tree.map(lambda a: _from_host(np.asarray(a), sharding), tree)

    def shard(self, *arrays):
        # Each device computes its slice of the batch.
        return [jax.lax.with_sharding_constraint(a, parallel.sharded(self.mesh)) for a in arrays]

    def apply(self, weights, images, unroll: bool = False):
        """Float32 logits of uint8 images, dropout off: (batch, classes), or (members, batch,
        classes) for an ensemble (`unroll`: for_each_member's)."""
        x = data_lib.scale_pixels(images, self.pixels)
        run = lambda w: nnx.merge(self.graphdef, w)(x).astype(jnp.float32)  # noqa: E731
        if not self.members:
            return run(weights)
        return for_each_member(self.mesh.devices.flat[0].platform, run, weights, unroll=unroll)

    def _probabilities(self, weights, images, unroll: bool = False):
        """Softmax outputs; an ensemble's are its members' mean, and each member's as well.
        With test-time augmentation each is the mean over the views."""
        probs = jax.nn.softmax(self.apply(weights, images, unroll))
        if self.tta > 1:
            # One view at a time: all at once would hold tta times the activations.
            each = jax.lax.map(lambda v: jax.nn.softmax(self.apply(weights, v, unroll)),
                               augment.views(images, self.tta - 1))  # fmt: skip
            probs = (probs + each.sum(0)) / self.tta
        return (probs.mean(0), probs) if self.members else (probs, None)

    def mean_probabilities(self, weights, images):
        """Softmax outputs (an ensemble's mean) of uint8 or 0..255 float images, traced into
        the caller's program at this network's own matmul precision; no gradient flows back
        through them. An ensemble's members unrolled: in a training step (--distill-views)
        that ran 7% faster than in a loop (BENCHMARKS.md)."""
        with jax.default_matmul_precision(self.precision) if self.precision else nullcontext():
            return jax.lax.stop_gradient(self._probabilities(weights, images, unroll=True)[0])

    @functools.cached_property
    def eval_step(self):
        # Every process gets every prediction (across processes they would stay sharded).
        replicated = parallel.replicated(self.mesh)
        return compile_fn(self._eval_step, self.mesh, self.precision, out_shardings=replicated)

    def _eval_step(self, params, images, labels, order, n, i):
        TRACE_COUNTS["eval_step"] += 1
        idx, weights = batch_of(order, i, self.eval_batch, n)
        x, y, weights = self.shard(images[idx], labels[idx], weights)
        if self.members or self.tta > 1:
            probs, each = self._probabilities(params, x)
            predictions = jnp.argmax(probs, -1)
            losses = probability_losses(probs, y)
            member_correct = (
                jnp.sum((jnp.argmax(each, -1) == y) * weights, axis=-1)
                if self.members
                else jnp.zeros(0)
            )
        else:
            logits = self.apply(params, x)
            predictions = jnp.argmax(logits, -1)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            member_correct = jnp.zeros(0)
        sums = jnp.stack(
            [jnp.sum(losses * weights), jnp.sum((predictions == y) * weights), jnp.sum(weights)]
        )
        return sums, predictions, member_correct

    @functools.cached_property
    def probabilities(self):
        """Softmax outputs for a batch of uint8 images, as Keras' `predict` gives them (an
        ensemble's mean)."""
        return self._split_over_devices(0)

    @functools.cached_property
    def member_probabilities(self):
        """Each ensemble member's softmax outputs, (members, batch, classes)."""
        return self._split_over_devices(1)

    def _split_over_devices(self, which: int):
        """`_probabilities`' output `which` for a batch of any size, each device classifying a
        slice of it. Left replicated, every device classified the whole batch: a test split
        over two CPU devices ran at half the speed of one network's forward passes."""
        replicated = parallel.replicated(self.mesh)

        def apply(weights, images):
            return self._probabilities(weights, self.shard(images)[0])[which]

        compiled = compile_fn(apply, self.mesh, self.precision, out_shardings=replicated)
        batch_axis = 1 if which else 0

        def run(weights, images):
            pad = -images.shape[0] % self.mesh.size  # a slice for each device
            if pad:
                images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            out = compiled(weights, images)
            if not pad or out is None:  # None: one network's "members"
                return out
            return jax.lax.slice_in_dim(out, 0, out.shape[batch_axis] - pad, axis=batch_axis)

        run.lower = compiled.lower
        return run


def probability_losses(probs, labels) -> jax.Array:
    """Each row's cross-entropy against averaged probabilities (an ensemble's, test-time views',
    a committee's), which have no logits to take it from; floored away from log(0)."""
    return -jnp.log(jnp.take_along_axis(probs, labels[:, None], -1)[:, 0] + 1e-12)


def evaluate(predictor: Predictor, params, images, labels) -> dict[str, Any]:
    """Loss, accuracy and predictions over a whole set, in padded batches; for an ensemble,
    each member's accuracy too."""
    n = len(labels)
    order, images, labels_dev = predictor.place(
        (padded_order(np.arange(n), predictor.eval_batch), images, labels)
    )
    outputs = [
        predictor.eval_step(params, images, labels_dev, order, n, i)
        for i in range(ceil_div(n, predictor.eval_batch))
    ]
    loss, correct, count = np.sum([np.asarray(sums) for sums, _, _ in outputs], axis=0)
    predictions = np.concatenate([np.asarray(p) for _, p, _ in outputs])[:n]
    result = {
        "loss": float(loss / count),
        "accuracy": float(correct / count),
        "n": int(count),
        "predictions": predictions,
    }
    if predictor.members:
        member_correct = np.sum([np.asarray(m) for _, _, m in outputs], axis=0)
        result["member_accuracy"] = [float(c / count) for c in member_correct]
    return result
