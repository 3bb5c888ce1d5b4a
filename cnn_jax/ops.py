"""The layers' arithmetic in the forms XLA runs fastest on each backend.

`conv3x3` is Keras' Conv2D(3x3, "valid", stride 1) written as one matrix product over the nine
shifted views of the input (im2col). XLA:CPU runs that, and its gradient, through its tuned matrix
kernels, where its direct convolution is slow; on GPU cuDNN's convolution is the fast one. The
values are those of `lax.conv_general_dilated` up to float rounding (tests/test_ops.py).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from cnn_jax import onednn
from cnn_jax.config import CONVS
from cnn_jax.errors import UserError


def conv3x3_matmul(inputs, kernel, window_strides=None, padding=None, **unused):
    """A drop-in for `lax.conv_general_dilated` for NHWC/HWIO, stride 1, VALID convolutions."""
    if tuple(window_strides or (1, 1)) != (1, 1) or padding not in ("VALID", None):
        raise ValueError("conv3x3_matmul handles stride 1, VALID convolutions only")
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = inputs.shape
    ho, wo = h - kh + 1, w - kw + 1
    # Channel order (dy, dx, cin) matches the HWIO kernel's flattening.
    cols = jnp.concatenate(
        [inputs[:, dy : dy + ho, dx : dx + wo, :] for dy in range(kh) for dx in range(kw)], axis=-1
    )
    out = cols.reshape(b * ho * wo, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)
    return out.reshape(b, ho, wo, cout)


def conv_for_loops(inputs, kernel, window_strides=None, padding=None, **unused):
    """A drop-in for `lax.conv_general_dilated` for NHWC/HWIO, stride 1, "VALID" or "SAME"
    convolutions of odd kernels, whose gradients are written as forward convolutions.

    Inside a compiled loop (`--steps-per-call` above 1 runs steps in a `lax.scan`) XLA:CPU keeps
    the gradients' transposed operand layouts, which its fast convolution cannot take, and runs
    them as plain loops: a Model 3 step took 40x as long (BENCHMARKS.md). Transposed by hand,
    both gradients stay ordinary convolutions there; outside a loop XLA's own are faster.
    """
    if tuple(window_strides or (1, 1)) != (1, 1) or padding not in ("VALID", "SAME"):
        raise ValueError("conv_for_loops handles stride 1, VALID or SAME convolutions only")
    return _conv_for_loops(inputs, kernel, kernel.shape[0] // 2 if padding == "SAME" else 0)


def _conv(x, kernel, pad: int):
    return lax.conv_general_dilated(
        x, kernel, (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_for_loops(x, kernel, pad: int):
    return _conv(x, kernel, pad)


def _conv_for_loops_grads(pad, residuals, g):
    x, kernel = residuals
    full = kernel.shape[0] - 1 - pad
    dx = _conv(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), full)
    # The kernel's gradient sums over the images: as a convolution, the channels are its batch
    # and the images its features. The barrier keeps XLA from folding the transposes back
    # into the convolution's dimension numbers, the layout that is slow in a loop.
    xt = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).transpose(3, 1, 2, 0)
    xt, gt = lax.optimization_barrier((xt, g.transpose(1, 2, 0, 3)))
    return dx, _conv(xt, gt, 0).transpose(1, 2, 0, 3)


_conv_for_loops.defvjp(lambda x, k, pad: (_conv(x, k, pad), (x, k)), _conv_for_loops_grads)


def resolve_conv(conv: str, platform: str | None = None, looped: bool = False):
    """The convolution function for a `--conv` choice; 'auto' picks by the platform that runs
    it (the default backend's when None). `looped`: the training steps run inside a compiled
    loop, where XLA's own convolution on CPU needs `conv_for_loops`' gradients."""
    if conv not in CONVS:
        raise ValueError(f"unknown convolution {conv!r}: choose one of {', '.join(CONVS)}")
    cpu = (platform or jax.default_backend()) == "cpu"
    if conv == "auto":
        conv = "matmul" if cpu else "lax"
    if conv == "matmul":
        return conv3x3_matmul
    if conv == "onednn":
        if not cpu:
            raise UserError("--conv onednn is for the CPU: leave --conv at auto on an accelerator")
        onednn.load()  # here, where a missing extra is the user's to fix, not in a trace
        return onednn.conv_general_dilated
    return conv_for_loops if looped and cpu else lax.conv_general_dilated


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """Keras' MaxPooling2D((2, 2)): stride = pool size, "valid" (an odd last row is dropped).

    Written as reshape + max rather than `nnx.max_pool`: on CPU the gradient of `reduce_window`
    lowers to select-and-scatter, which doubled the whole training step. The gradient is written
    out too (`_pool_grad`): JAX's own gradient of a max splits ties and cost twice as much.
    """
    return _pool(x)


def _pool(x):
    return _windows(x).max(axis=(2, 4))


def _windows(x):
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


def _pool_grad(x, g):
    """Each window's gradient goes to its first maximum in row-major order, as TensorFlow's
    MaxPoolGrad sends it (a strict `>` scan), so ties (flat image regions) train as in Keras."""
    win = _windows(x)
    is_max = win == win.max(axis=(2, 4), keepdims=True)
    first, seen = [], jnp.zeros_like(is_max[:, :, 0, :, 0])
    for dy in range(2):
        for dx in range(2):
            hit = is_max[:, :, dy, :, dx]
            first.append(hit & ~seen)
            seen = seen | hit
    # Back to the (batch, h/2, dy, w/2, dx, channel) layout of _windows.
    mask = jnp.stack([jnp.stack(first[2 * dy : 2 * dy + 2], axis=3) for dy in range(2)], axis=2)
    grad = jnp.where(mask, g[:, :, None, :, None, :], 0)
    b, h, w, c = x.shape
    grad = grad.reshape(b, h // 2 * 2, w // 2 * 2, c)
    return jnp.pad(grad, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


max_pool_2x2.defvjp(lambda x: (_pool(x), x), lambda x, g: (_pool_grad(x, g).astype(x.dtype),))


def batch_norm(norm: nnx.BatchNorm, x: jax.Array, training: bool, mask=None) -> jax.Array:
    """`norm`'s batch normalisation of NHWC `x`: in training with the batch's statistics of the
    rows `mask` marks (all without one), updating the running ones; else with those.

    The statistics as Flax computes them (mean of x and of x squared, biased variance), but
    summed per image first and weighted by the mask after: Flax's masked form, a mask
    broadcast to the activations, took a quarter of Model 3's training step on CPU.
    """
    if training:
        xs = x.astype(jnp.float32)
        rows = jnp.ones(x.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(rows), 1.0) * x.shape[1] * x.shape[2]
        mean = rows @ jnp.sum(xs, axis=(1, 2)) / count
        var = jnp.maximum(rows @ jnp.sum(jnp.square(xs), axis=(1, 2)) / count - mean**2, 0.0)
        m = norm.momentum
        norm.mean[...] = m * norm.mean[...] + (1 - m) * mean
        norm.var[...] = m * norm.var[...] + (1 - m) * var
    else:
        mean, var = norm.mean[...], norm.var[...]
    scale = norm.scale[...] * lax.rsqrt(var + norm.epsilon)
    return (x * scale + (norm.bias[...] - mean * scale)).astype(x.dtype)
