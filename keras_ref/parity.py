"""Measured differences between the Flax port and the Keras reference, for tests and scripts.

Both sides start from the same weights (copied from a seeded Keras model) and see the same
inputs; dropout is off, as inference is and as training must be for a step-by-step comparison.
"""

import keras
import numpy as np
from flax import nnx

from cnn_jax.config import Config
from cnn_jax.steps import create_trainer
from keras_ref.convert import keras_weights, set_keras_weights
from keras_ref.models import create_model, logits_model


def twins(model: int, image_size: int = 30, num_classes: int = 43, seed: int = 0, dropout=0.5):
    """A seeded Keras model and a cnn_jax Trainer and state holding the same weights."""
    keras.utils.set_random_seed(seed)
    net = create_model(model, image_size, num_classes)
    if model == 3:
        _randomise_batch_norm(net, seed)
    # Full float32 products: a GPU's default TF32 (10-bit mantissas) would loosen the comparison.
    cfg = Config(
        model=model, image_size=image_size, dropout=dropout, pixels="unit", precision="highest"
    )
    trainer, state = create_trainer(cfg, num_classes)
    set_keras_weights(state, net, model)
    return net, trainer, state


def _randomise_batch_norm(net: keras.Model, seed: int) -> None:
    """Batch norm starts as the identity (scale 1, shift 0, mean 0, variance 1), which would
    hide a swapped or dropped array; seeded values in their ranges expose it."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n)
            mean, var = rng.normal(0, 0.1, n), rng.uniform(0.5, 2.0, n)
            layer.set_weights([a.astype(np.float32) for a in (gamma, beta, mean, var)])


def random_images(n: int, image_size: int = 30, seed: int = 0, flat: bool = False) -> np.ndarray:
    """Noise images; `flat` paints each top half one colour, so max-pool windows hold ties."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, image_size, image_size, 3), np.uint8)
    if flat:
        images[:, : image_size // 2] = rng.integers(0, 256, (n, 1, 1, 3), np.uint8)
    return images


def forward_difference(model: int, n: int = 64, seed: int = 0) -> dict:
    """Max |Flax logits - Keras pre-softmax outputs| and prediction agreement on random images."""
    net, trainer, state = twins(model, seed=seed)
    images = random_images(n, seed=seed)
    x = images.astype(np.float32) / 255.0
    ours = np.asarray(trainer.predictor.apply(state.weights, images))
    theirs = np.asarray(logits_model(net)(x, training=False))
    return {
        "max_abs": float(np.max(np.abs(ours - theirs))),
        "logit_scale": float(np.max(np.abs(theirs))),
        "same_predictions": bool(np.array_equal(ours.argmax(-1), theirs.argmax(-1))),
    }


def _at(tree: dict, path: str) -> dict:
    """keras_weights' 'convs/0' path in a pure dict of NNX state (list indices are ints)."""
    for key in path.split("/"):
        tree = tree[int(key) if key.isdigit() else key]
    return tree


def _merged(a: dict, b: dict) -> dict:
    """Two pure dicts of NNX state (parameters, batch statistics) as one, merged per level."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def training_difference(
    model: int, steps: int = 5, batch: int = 32, seed: int = 0, flat: bool = False, sgd=None
) -> dict:
    """Max |weight difference| after `steps` Adam steps on the same fixed batches, dropout off
    (Model 3's batch statistics included); with `sgd` a learning rate, plain gradient descent
    on both sides instead."""
    net, trainer, state = twins(model, seed=seed, dropout=0.0)
    net.get_layer("dropout").rate = 0.0
    if sgd is not None:
        import dataclasses

        import optax

        net.compile(optimizer=keras.optimizers.SGD(sgd), loss="categorical_crossentropy")
        trainer = dataclasses.replace(trainer, tx=optax.sgd(sgd))
        state = trainer.place(trainer.init_state(state.params, state.batch_stats))
    images = random_images(steps * batch, seed=seed + 1, flat=flat)
    labels = np.random.default_rng(seed + 2).integers(0, 43, steps * batch).astype(np.int32)
    x = images.astype(np.float32) / 255.0
    y = keras.utils.to_categorical(labels, 43)
    order = np.arange(steps * batch, dtype=np.int32)
    for i in range(steps):
        s = slice(i * batch, (i + 1) * batch)
        net.train_on_batch(x[s], y[s])
        state = trainer.train_step(state, images, labels, order, len(order), i, 0)
    stats = nnx.to_pure_dict(state.batch_stats) if state.batch_stats else {}
    ours = _merged(nnx.to_pure_dict(state.params), stats)
    theirs = keras_weights(net, model)
    start = keras_weights(twins(model, seed=seed)[0], model)
    diff = moved = 0.0
    for layer, arrays in theirs.items():
        for name, value in arrays.items():
            mine = np.asarray(_at(ours, layer)[name])
            diff = max(diff, float(np.max(np.abs(mine - value))))
            moved = max(moved, float(np.max(np.abs(value - start[layer][name]))))
    return {"max_abs": diff, "max_weight_change": moved}


def gradient_differences(model: int, image_size: int = 32, batch: int = 32, seed: int = 0):
    """Both sides' loss and gradients on one batch in training mode (batch statistics, dropout
    off): (our loss, Keras' loss, {'layer/name': max |difference| / Keras' largest value})."""
    import jax
    import jax.numpy as jnp
    import tensorflow as tf

    from cnn_jax.steps import cross_entropy

    net, trainer, state = twins(model, image_size=image_size, seed=seed, dropout=0.0)
    net.get_layer("dropout").rate = 0.0
    images = random_images(batch, image_size=image_size, seed=seed + 1)
    labels = np.random.default_rng(seed + 2).integers(0, 43, batch).astype(np.int32)
    with tf.GradientTape() as tape:
        probs = net(images.astype(np.float32) / 255.0, training=True)
        theirs = tf.reduce_mean(keras.losses.categorical_crossentropy(
            keras.utils.to_categorical(labels, 43), probs))  # fmt: skip
    keras_grads = iter(g.numpy() for g in tape.gradient(theirs, net.trainable_weights))

    def loss(params, stats):
        logits, _ = trainer.apply(params, jnp.asarray(images), jax.random.key(0), stats or None)
        return cross_entropy(logits, jnp.asarray(labels), jnp.ones(batch))

    to_device = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    params, stats = to_device(state.params), to_device(state.batch_stats or nnx.State({}))
    # One compiled program: op by op, Model 3's pass compiles hundreds of small ones.
    ours, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, stats)
    grads = nnx.to_pure_dict(grads[0])
    differences = {}
    for layer, arrays in keras_weights(net, model).items():
        for name in arrays:
            if name in ("mean", "var"):  # running statistics: no gradient
                continue
            want = next(keras_grads)
            got = np.asarray(_at(grads, layer)[name])
            differences[f"{layer}/{name}"] = float(np.abs(got - want).max() / np.abs(want).max())
    return float(ours), float(theirs), differences
