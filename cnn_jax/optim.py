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


OPTIMIZERS = {"keras-adam": keras_adam, "adam": optax.adam}


def create_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """'keras-adam' (the default, Keras' formula) or 'adam' (optax's)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](learning_rate)
