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


@pytest.mark.parametrize("members", [0, 3])
def test_the_recipes_optimizer_is_optax_adamw_decaying_kernels_only(members):
    """create_optimizer with optax's Adam, weight decay and the cosine schedule takes the
    steps of optax.adamw masked to the kernels, for one network and for an ensemble (whose
    members the Trainer updates under vmap, so the mask sees each member's shapes). The
    same elementwise formulas in the same order: equal to the last bit is expected, and a
    few float32 ulps (2**-23 relative) per step from fused multiply-adds are all it may
    differ by; rtol 1e-6 allows that over 6 steps."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from cnn_jax import models, optim
    from cnn_jax.config import Config

    cfg = Config(model=3, image_size=16, optimizer="adam", weight_decay=5e-4, epochs=2,
                 learning_rate=2e-3, schedule="cosine", warmup_epochs=1)  # fmt: skip
    # test_recipe's shapes: its initialisers' compiled programs come from the session's cache
    params = nnx.state(models.create_model(3, 16, 43), nnx.Param)
    kernels = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)  # noqa: E731
    ours = optim.create_optimizer(cfg, steps_per_epoch=3)
    ref = optax.adamw(optim.schedule(cfg, 3), weight_decay=5e-4, mask=kernels)
    if members:
        params = jax.tree.map(lambda a: jnp.stack([a * (1 + m) for m in range(members)]), params)
    grads = jax.tree.map(lambda a: jnp.cos(a * 7.0), params)  # no zeros, no symmetry
    trees = []
    for tx in (ours, ref):
        init, update = tx.init, tx.update
        if members:
            init, update = jax.vmap(init), jax.vmap(update)

        @jax.jit  # one program, not a compiled operation per leaf and step
        def step(p, s, update=update):
            u, s = update(grads, s, p)
            return optax.apply_updates(p, u), s

        p, s = params, jax.jit(init)(params)
        for _ in range(6):
            p, s = step(p, s)
        trees.append(p)
    for a, b in zip(*map(jax.tree.leaves, trees)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    # The mask is real: with zero gradients only the kernels shrink, biases and scales stay.
    zero = jax.tree.map(jnp.zeros_like, params)
    init, update = (
        (jax.vmap(ours.init), jax.vmap(ours.update)) if members else (ours.init, ours.update)
    )
    state, update = jax.jit(init)(params), jax.jit(update)
    u, state = update(zero, state, params)  # warmup's first step has rate 0
    u, state = update(zero, state, params)
    for path, step in jax.tree_util.tree_flatten_with_path(u)[0]:
        per_member = step.ndim - (1 if members else 0)
        assert (np.abs(step).max() > 0) == (per_member > 1), path
