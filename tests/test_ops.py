"""The fast formulations against the plain XLA ones, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from numerics import assert_same_function, assert_within, bound

from cnn_jax import ops
from cnn_jax.models import create_model


@pytest.fixture(autouse=True)
def on_cpu():
    """Exact float32 products: a GPU's default TF32 is tested at `highest` in test_gpu.py."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _lax_conv(x, k):
    return lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("shape", [(4, 30, 30, 3, 32), (3, 13, 11, 32, 64)])
def test_matmul_conv_equals_lax_conv_with_gradients(shape):
    b, h, w, cin, cout = shape
    x = jax.random.normal(jax.random.key(0), (b, h, w, cin))
    k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.1
    fast = ops.conv3x3_matmul(x, k, (1, 1), "VALID")
    # Each output sums 9·C_in products; their absolute values, summed, are the same
    # convolution of |x| and |k|.
    values_bound = bound(9 * cin, _lax_conv(jnp.abs(x), jnp.abs(k)))
    assert_within(fast, _lax_conv(x, k), values_bound, "values")
    w_out = jax.random.normal(jax.random.key(2), fast.shape)
    loss_fast = lambda x, k: jnp.sum(ops.conv3x3_matmul(x, k, (1, 1), "VALID") * w_out)  # noqa: E731
    loss_ref = lambda x, k: jnp.sum(_lax_conv(x, k) * w_out)  # noqa: E731
    # The gradient of x sums over the 9·C_out outputs each pixel feeds, that of k over every
    # position; the gradients of the same loss on absolute values are their Σ|terms|.
    loss_abs = lambda x, k: jnp.sum(_lax_conv(x, k) * jnp.abs(w_out))  # noqa: E731
    scales = jax.grad(loss_abs, (0, 1))(jnp.abs(x), jnp.abs(k))
    terms = (9 * cout, b * (h - 2) * (w - 2))
    grads = zip(jax.grad(loss_fast, (0, 1))(x, k), jax.grad(loss_ref, (0, 1))(x, k), scales, terms)
    for name, (g_fast, g_ref, scale, n) in zip(("x", "k"), grads, strict=True):
        assert_within(g_fast, g_ref, bound(n, scale), f"gradient of {name}")


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_conv_for_loops_equals_lax_conv_with_gradients_inside_a_loop(padding):
    """The gradients written as forward convolutions, run where they are meant for: a scan."""
    x = jax.random.normal(jax.random.key(0), (3, 9, 7, 8))
    k = jax.random.normal(jax.random.key(1), (3, 3, 8, 16)) * 0.1
    conv = lambda x, k: lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    w_out = jax.random.normal(jax.random.key(2), conv(x, k).shape)

    def grads_in_scan(f):
        loss = lambda x, k: jnp.sum(f(x, k, (1, 1), padding) * w_out)  # noqa: E731
        body = lambda c, _: (c, jax.grad(loss, (0, 1))(x, c))  # noqa: E731
        return jax.tree.map(lambda g: g[-1], jax.lax.scan(body, k, length=2)[1])

    assert_within(ops.conv_for_loops(x, k, (1, 1), padding), conv(x, k), bound(72, conv(
        jnp.abs(x), jnp.abs(k))), "values")  # fmt: skip
    reference = lambda x, k, s, p: conv(x, k)  # noqa: E731
    scales = jax.grad(lambda x, k: jnp.sum(conv(x, k) * jnp.abs(w_out)), (0, 1))(
        jnp.abs(x), jnp.abs(k)
    )
    terms = (9 * 16, 3 * 9 * 7)
    got, want = grads_in_scan(ops.conv_for_loops), grads_in_scan(reference)
    for name, g, r, scale, n in zip("xk", got, want, scales, terms, strict=True):
        assert_within(g, r, bound(n, scale), f"gradient of {name}")


def test_looped_training_uses_the_loop_safe_convolution_on_cpu_only():
    assert ops.resolve_conv("lax", "cpu", looped=True) is ops.conv_for_loops
    assert ops.resolve_conv("lax", "cpu") is lax.conv_general_dilated
    assert ops.resolve_conv("lax", "gpu", looped=True) is lax.conv_general_dilated
    assert ops.resolve_conv("auto", "cpu", looped=True) is ops.conv3x3_matmul


def test_whole_models_agree_across_formulations():
    x = jax.random.uniform(jax.random.key(0), (8, 30, 30, 3))
    for model in (1, 2):
        a = create_model(model, conv="lax", seed=4)
        b = create_model(model, conv="matmul", seed=4)
        assert_same_function(a(x), b(x), f"model {model}")  # the layers: the test above


def test_pool_equals_max_pool_with_gradients():
    x = jax.random.normal(jax.random.key(0), (4, 13, 12, 5))  # odd height: last row dropped
    ref = lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # noqa: E731
    np.testing.assert_array_equal(ops.max_pool_2x2(x), ref(x))
    w = jax.random.normal(jax.random.key(1), ref(x).shape)
    g = jax.grad(lambda x: jnp.sum(ops.max_pool_2x2(x) * w))(x)
    g_ref = jax.grad(lambda x: jnp.sum(ref(x) * w))(x)
    np.testing.assert_array_equal(g, g_ref)


def test_pool_gradient_goes_to_each_windows_first_maximum():
    x = jnp.array([[0, 1, 2, 2], [1, 1, 2, 0], [3, 0, 0, 0], [3, 3, 0, 0]], jnp.float32)
    g = jax.grad(lambda x: jnp.sum(ops.max_pool_2x2(x[None, :, :, None])))(x)
    expected = [[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(g, expected)


@pytest.mark.parametrize("model", [1, 2])
def test_fused_blocks_equal_the_keras_layer_sequence(model):
    """`__call__` pools before the bias and ReLU; `outputs()` runs the Keras layer order."""
    m = create_model(model, seed=3, conv="matmul")
    assert m.pool_first
    x = jax.random.uniform(jax.random.key(0), (8, 30, 30, 3))
    np.testing.assert_array_equal(m(x), m.outputs(x)[-1][1])
    params = nnx.state(m, nnx.Param)
    graphdef = nnx.graphdef(m)

    def loss(params, layers):
        net = nnx.merge(graphdef, params)
        return jnp.sum(net.outputs(x)[-1][1] if layers else net(x)) ** 2

    fused, layered = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(layered), strict=True):
        assert_same_function(a, b, "gradient")


def test_auto_picks_by_backend_and_bad_choices_fail():
    expected = ops.conv3x3_matmul if jax.default_backend() == "cpu" else lax.conv_general_dilated
    assert ops.resolve_conv("auto") is expected
    with pytest.raises(ValueError, match="unknown convolution"):
        ops.resolve_conv("fft")
    with pytest.raises(ValueError, match="stride 1"):
        ops.conv3x3_matmul(jnp.zeros((1, 5, 5, 1)), jnp.zeros((3, 3, 1, 1)), (2, 2), "VALID")


def test_bfloat16_computes_in_bf16_with_float32_params():
    m = create_model(2, dtype="bfloat16")
    assert m.conv1.kernel[...].dtype == jnp.float32
    x = jax.random.uniform(jax.random.key(0), (2, 30, 30, 3))
    assert m(x).dtype == jnp.bfloat16
    ref = create_model(2)(x)
    np.testing.assert_allclose(np.asarray(m(x), np.float32), ref, atol=0.05)
