"""Keras-exact Adam as an optax transformation.

Keras 3 (keras/src/optimizers/adam.py) computes, at step t = iterations + 1,
    lr_t = lr * sqrt(1 - b2**t) / (1 - b1**t)
    w   -= lr_t * m / (sqrt(v) + eps),   eps = 1e-7
so epsilon is added to the *uncorrected* sqrt(v). `optax.adam` adds its eps (1e-8) after bias
correction, which differs most when gradients are small in the first steps.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cnn_jax.errors import UserError


class KerasAdamState(NamedTuple):
    count: jax.Array  # steps taken so far, int32
    mu: optax.Updates
    nu: optax.Updates


def scale_by_keras_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
    """Keras' Adam direction with its bias correction folded into the step, not yet scaled by lr."""

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return KerasAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (jnp.square(g) - v) * (1 - b2), state.nu, updates)
        correction = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(lambda m, v: correction * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, KerasAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def keras_adam(learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7):
    """Adam exactly as `keras.optimizers.Adam(learning_rate)` updates weights."""
    return optax.chain(scale_by_keras_adam(b1, b2, eps), optax.scale(-learning_rate))


DIRECTIONS = {"keras-adam": scale_by_keras_adam, "adam": optax.scale_by_adam}


def schedule(config, steps_per_epoch: int):
    """The learning rate: a constant, or linear warmup then cosine decay to 0 at the last step."""
    if config.schedule == "constant":
        return config.learning_rate
    total = max(config.epochs * steps_per_epoch, 1)
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total)


def _kernels(params):
    # Decay the weight matrices only: decaying biases and batch-norm scales only hurts.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """The config's optimizer: Adam's direction ('keras-adam', Keras' formula, or 'adam',
    optax's), decoupled weight decay as in AdamW when asked, scaled by the learning rate."""
    if config.optimizer not in DIRECTIONS:
        raise UserError(
            f"unknown optimizer {config.optimizer!r}: choose one of {', '.join(DIRECTIONS)}"
        )
    parts = [DIRECTIONS[config.optimizer]()]
    if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=_kernels))
    # A constant rate gives optax.scale(-rate): the same steps as keras_adam and optax.adam.
    parts.append(optax.scale_by_learning_rate(schedule(config, steps_per_epoch)))
    return optax.chain(*parts)
