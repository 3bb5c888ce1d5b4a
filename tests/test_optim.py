"""Keras-exact Adam against a NumPy transcription of keras/src/optimizers/adam.py."""

import types

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax.optim import create_optimizer, keras_adam


def keras_adam_reference(w, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
    """Keras 3's Adam.update_step, step by step, in float64."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        w = w - m * alpha / (np.sqrt(v) + eps)
    return w


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e-8])  # small gradients: the formulas differ most
def test_keras_adam_matches_keras_formula(scale):
    rng = np.random.default_rng(0)
    w0 = np.zeros(50, np.float32)  # Adam ignores the weights; zeros keep the deltas exact
    grads = [(rng.normal(size=(50,)) * scale).astype(np.float32) for _ in range(5)]
    tx = keras_adam(1e-3)
    w, state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, w)
        w = optax.apply_updates(w, updates)
    expected = keras_adam_reference(w0.astype(np.float64), [g.astype(np.float64) for g in grads])
    np.testing.assert_allclose(np.asarray(w) - w0, expected - w0, rtol=1e-4, atol=1e-9)

    # optax's adam takes visibly different steps on small gradients
    tx2, w2 = optax.adam(1e-3), jnp.asarray(w0)
    s2 = tx2.init(w2)
    for g in grads:
        u, s2 = tx2.update(jnp.asarray(g), s2, w2)
        w2 = optax.apply_updates(w2, u)
    if scale < 1e-5:
        assert not np.allclose(np.asarray(w2) - w0, expected - w0, rtol=1e-2)


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer(types.SimpleNamespace(optimizer="sgd"))
