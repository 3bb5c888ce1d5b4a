"""Loss, jit-compiled train and eval steps, the epoch loop and `fit`.

The training state is a plain pytree (params, optimizer state, step, running metrics) so that
it can be donated to the compiled step, checkpointed and restored on any device count. The data
set lives on the device once; each step slices its batch out of a per-epoch permutation, so
the host sends only a step number per step.
"""

import dataclasses
import functools
import hashlib
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cnn_jax import backend, parallel
from cnn_jax import data as data_lib
from cnn_jax.config import Config
from cnn_jax.models import count_params, create_model
from cnn_jax.optim import create_optimizer
from cnn_jax.report import Progress

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
        return -(-EVAL_BATCH // self.mesh.size) * self.mesh.size

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
        (_padded(np.arange(n), trainer.eval_batch), images, labels)
    )
    outputs = [
        trainer.eval_step(params, images, labels_dev, order, n, i)
        for i in range(-(-n // trainer.eval_batch))
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


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of an epoch: a seeded permutation, reproducible on resume."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint."""


def train_epoch(trainer, state, images, labels, order, seed, *, start=0, after_step=None):
    """Steps `start`.. of one pass over `order`, `trainer.steps_per_call` per compiled call.

    `after_step(step_in_epoch, state)` runs after each call; returning True stops the epoch
    early. Returns (state, ms per step of each call, steps done in the epoch, whether stopped).
    """
    n = len(order)
    steps = -(-n // trainer.batch_size)
    per_call = trainer.steps_per_call
    padded = trainer.place(_padded(order, trainer.batch_size))
    if start == 0:
        state = state._replace(metrics=trainer.place(np.zeros(3, np.float32)))
    step_ms = []
    t_last = time.perf_counter()
    i = start
    while i < steps:
        if per_call == 1:
            state = trainer.train_step(state, images, labels, padded, n, i, seed)
        else:
            state = trainer.train_steps(state, images, labels, padded, n, i, seed)
        # Waiting after each call costs little and makes the step times honest.
        state.metrics.block_until_ready()
        done = min(i + per_call, steps)
        now = time.perf_counter()
        step_ms.append((now - t_last) * 1e3 / (done - i))
        t_last, i = now, done
        if after_step is not None and after_step(i, state):
            return state, step_ms, i, True
    return state, step_ms, steps, False


# Settings that decide a run's result: a resumed run must not change them. `epochs` may grow.
RESUME_KEYS = (
    "model", "data", "layout", "image_size", "num_classes", "pixels", "test_size", "split",
    "batch_size", "learning_rate", "optimizer", "dropout", "dtype", "precision", "seed",
    "synthetic_per_class",
)  # fmt: skip


# How a user names a setting on the command line, where it is not --field-name.
_FLAG_NAMES = {"learning_rate": "--lr", "data": "the data argument"}


def _check_resumable(saved: dict, config: Config, fingerprint: str, workdir: Path) -> None:
    for key in RESUME_KEYS:
        if saved["config"].get(key) != getattr(config, key):
            flag = _FLAG_NAMES.get(key, f"--{key.replace('_', '-')}")
            raise ValueError(
                f"{flag} is {getattr(config, key)!r} but the run in "
                f"{workdir} used {saved['config'].get(key)!r}: use the same setting to resume, "
                "or --restart / another --workdir to start over"
            )
    if saved.get("data_fingerprint") != fingerprint:
        raise ValueError(
            f"the data differs from the run in {workdir} (other files or labels): resume with "
            "the same data, or --restart / another --workdir to start over"
        )


def data_fingerprint(dataset: data_lib.Dataset) -> str:
    """SHA-256 of the file names, labels and pixels, to refuse resuming on other data."""
    h = hashlib.sha256("\n".join(map(str, dataset.paths)).encode())
    h.update(np.ascontiguousarray(dataset.labels, np.int32).tobytes())
    h.update(np.ascontiguousarray(dataset.images).tobytes())
    return h.hexdigest()


def fit(
    config: Config,
    dataset: data_lib.Dataset,
    workdir: Path | None = None,
    verbose: bool = True,
    *,
    restart: bool = False,
    resume_fallback: bool = False,
    save_every: int | None = None,
    should_stop=None,
):
    """Splits the data, trains, evaluates on the test split; writes config and metrics JSON.

    With a workdir, a checkpoint is saved after every epoch (and every `save_every` steps), and
    a workdir that already holds checkpoints is resumed from its latest one. `should_stop()`
    is polled after every step; when it returns True a checkpoint is saved and `Interrupted`
    is raised.
    """
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
    steps_per_epoch = -(-len(train_idx) // config.batch_size)
    trainer, state = create_trainer(config, num_classes, steps_per_epoch)
    train_images, train_labels, test_images, test_labels = trainer.place(
        (
            dataset.images[train_idx],
            dataset.labels[train_idx],
            dataset.images[test_idx],
            dataset.labels[test_idx],
        )
    )
    metrics = {
        "model": config.model,
        "params": count_params(nnx.merge(trainer.graphdef, state.params)),
        "num_classes": num_classes,
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "skipped_files": [{"path": p, "reason": r} for p, r in dataset.skipped],
        **_device_record(trainer, config),
        "epochs": [],
    }
    say = print if verbose else (lambda *a, **k: None)
    if metrics["platform"] == "gpu" and config.deterministic != backend.deterministic_ops():
        say(
            f"warning: deterministic GPU ops are {'off' if config.deterministic else 'on'} in "
            "this process (XLA_FLAGS is read when JAX starts): see cnn_jax.backend"
        )
    store, first_epoch, start = None, 0, 0
    if workdir is not None:
        from cnn_jax.checkpoint import Checkpoints  # orbax is slow to import

        fingerprint = data_fingerprint(dataset)  # hashes every pixel: only runs that checkpoint

        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        store = Checkpoints(workdir)
        if restart:
            store.clear()
        elif store.steps():
            check = lambda meta: _check_resumable(meta, config, fingerprint, workdir)  # noqa: E731
            state, meta = _restore_latest(store, state, resume_fallback, say, check)
            state = trainer.place(state)  # restored as host arrays: any device count works
            first_epoch, start = meta["epoch"], meta["step_in_epoch"]
            metrics["epochs"] = meta["epochs"]
            say(f"resuming {workdir} from step {int(state.step)} (epoch {first_epoch + 1}, "
                f"step {start})")  # fmt: skip
        config.write(workdir / "config.json")

    def save(epoch, step_in_epoch, state, test_accuracy=None):
        meta = {
            "config": dataclasses.asdict(config),
            "num_classes": num_classes,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "epochs": metrics["epochs"],
            "data_fingerprint": fingerprint,
        }
        store.save(int(state.step), state, meta, test_accuracy)

    all_step_ms = []
    for epoch in range(first_epoch, config.epochs):
        order = epoch_order(config.seed, epoch, len(train_idx))
        progress = Progress(epoch, config.epochs, steps_per_epoch, verbose)
        last = [start]  # the step in the epoch where the previous call ended

        def after_step(i, s, epoch=epoch, progress=progress, last=last):
            progress.update(i, s.metrics)
            # Saves when a call crosses a multiple of save_every (a call may run many steps);
            # the epoch's last step is saved by the epoch-end checkpoint below.
            step = int(s.step)
            crossed = save_every and step // save_every > (step - (i - last[0])) // save_every
            if store is not None and crossed and i < steps_per_epoch:
                save(epoch, i, s)
            last[0] = i
            return should_stop is not None and should_stop()

        t0 = time.perf_counter()
        state, step_ms, done, stopped = train_epoch(
            trainer, state, train_images, train_labels, order, config.seed,
            start=start, after_step=after_step,
        )  # fmt: skip
        # The run's first call compiles: left out, also when an epoch is one call.
        all_step_ms += step_ms[1:] if epoch == first_epoch else step_ms
        if done < steps_per_epoch:  # stopped on request mid-epoch
            if store is not None and int(state.step) not in store.steps():
                save(epoch, done, state)
            _interrupted(store, progress, state, epoch, done, steps_per_epoch)
        start = 0
        loss_sum, correct, count = np.asarray(state.metrics)
        record = {
            "train_loss": float(loss_sum / count),
            "train_accuracy": float(correct / count),
            "seconds": time.perf_counter() - t0,
        }
        if config.eval_every_epoch or store is not None:
            ev = evaluate(trainer, state.params, test_images, test_labels)
            record.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        progress.close(record)
        metrics["epochs"].append(record)
        if store is not None:
            save(epoch + 1, 0, state, record["test_accuracy"])
        if stopped:  # on the epoch's last step: the epoch-end checkpoint is the one to resume
            _interrupted(store, None, state, epoch + 1, 0, steps_per_epoch)
    ev = evaluate(trainer, state.params, test_images, test_labels)
    metrics.update(
        test_loss=ev["loss"],
        test_accuracy=ev["accuracy"],
        median_step_ms=statistics.median(all_step_ms) if all_step_ms else None,
        # the process's peak resident memory so far (Linux reports KiB)
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if store is not None:
        store.close()
        metrics["checkpoints"] = str(store.directory)
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return state, metrics


def _device_record(trainer: Trainer, config: Config) -> dict[str, Any]:
    """Where the run trains, for metrics.json: platform, devices, and how."""
    device = trainer.mesh.devices.flat[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": trainer.mesh.size,
        "steps_per_call": trainer.steps_per_call,
        "precision": config.precision,
        # CPU runs repeat bit for bit anyway; on a GPU it takes XLA's deterministic ops.
        "deterministic": device.platform == "cpu" or backend.deterministic_ops(),
    }


def _interrupted(store, progress, state, epoch, step_in_epoch, steps_per_epoch):
    if store is not None:
        store.close()
    if progress is not None:
        progress.interrupt()
    where = f"; checkpoint saved in {store.directory}" if store is not None else ""
    raise Interrupted(
        f"stopped at step {int(state.step)} (epoch {epoch + 1}, step {step_in_epoch} of "
        f"{steps_per_epoch}){where}"
    )


def _restore_latest(store, template, fallback: bool, say, check):
    """The newest checkpoint; with `fallback`, the newest intact one when newer ones are corrupt.

    `check(meta)` runs before the arrays are read, so a changed setting is named as such.
    """
    from cnn_jax.checkpoint import CheckpointError

    for step in reversed(store.steps()):
        try:
            check(store.read_meta(step))
            return store.restore(step, template)
        except CheckpointError as e:
            if not fallback:
                msg = f"{e}; --resume-fallback resumes from the newest intact one"
                raise CheckpointError(msg) from None
            say(f"warning: {e}; trying an older checkpoint")
    raise CheckpointError(f"no intact checkpoint in {store.directory}; use --restart")
