"""The tutorial's two traffic-sign CNNs, and a third built for the task, as Flax NNX modules.

Layer names (conv1, conv2, dense1, logits) match the Keras reference so weights map name to name.
The models return logits; softmax lives in the loss and in predict.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cnn_jax import onednn, ops
from cnn_jax.config import MIN_IMAGE_SIZE
from cnn_jax.errors import UserError
from cnn_jax.stn import SpatialTransformer

# Keras' Conv2D and Dense default to glorot_uniform kernels and zero biases
# (keras/src/layers/convolutional/base_conv.py, keras/src/layers/core/dense.py); Flax defaults
# to lecun_normal, which trains differently with raw 0..255 pixels.
_KERNEL_INIT = nnx.initializers.glorot_uniform()
_BIAS_INIT = nnx.initializers.zeros_init()


class Conv3x3(nnx.Conv):
    """nnx.Conv as Keras' Conv2D(3x3, "valid"), plus the conv -> ReLU -> 2x2 max-pool block."""

    def pooled_relu(self, x: jax.Array) -> jax.Array:
        """relu(pool(conv(x) + b)) computed as relu(pool(conv(x)) + b).

        The same numbers, bit for bit: adding b and taking the ReLU are monotonic, also in
        floating point, so they commute with the max. Done after the pool they touch a quarter
        of the values; with the pool's own gradient (ops.max_pool_2x2) a Model 2 training step
        on CPU went from about 7.8 to 5.5 ms (BENCHMARKS.md).
        """
        x, kernel, bias = self.promote_dtype(
            (x, self.kernel[...], self.bias[...]), dtype=self.dtype
        )
        z = self.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return nnx.relu(ops.max_pool_2x2(z) + bias)

    def same(self, x: jax.Array) -> jax.Array:
        """Keras' Conv2D(3x3, "same"), no bias. XLA's own convolution is given the padding:
        padding first and convolving "valid" made Model 3's step 1.3-1.4x slower on a 2-core
        CPU (BENCHMARKS.md). The matmul form needs the padded input."""
        if self.conv_general_dilated is ops.conv3x3_matmul:
            return self(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
        x, kernel = self.promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        return self.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )


@dataclasses.dataclass(frozen=True)
class _Layers:
    """How the layers compute: convolution formulation and compute dtype (params stay fp32)."""

    conv: Callable = jax.lax.conv_general_dilated
    dtype: Any = None  # None: float32; bfloat16 computes in bf16
    # Conv blocks pool before their bias and ReLU (Conv3x3.pooled_relu). That pays with the
    # matmul convolution in training; XLA's own convolution runs Keras' order faster, as it
    # fuses the bias and ReLU into the convolution (inference: 18k vs 11k images/s on CPU).
    pool_first: bool = False
    # Model 3's first convolution (3 input channels): None is `conv`.
    first_conv: Callable | None = None

    def conv3x3(self, in_features, out_features, rngs, use_bias=True, conv=None) -> Conv3x3:
        # Keras Conv2D pads "valid"; nnx.Conv defaults to 'SAME'. The tuple keeps the kernel 2-D.
        return Conv3x3(
            in_features,
            out_features,
            kernel_size=(3, 3),
            padding="VALID",
            use_bias=use_bias,
            kernel_init=_KERNEL_INIT,
            bias_init=_BIAS_INIT,
            conv_general_dilated=conv or self.conv,
            dtype=self.dtype,
            rngs=rngs,
        )

    def dense(self, in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(
            in_features,
            out_features,
            kernel_init=_KERNEL_INIT,
            bias_init=_BIAS_INIT,
            dtype=self.dtype,
            rngs=rngs,
        )


def _after_block(size: int) -> int:
    """Spatial size after a 3x3 VALID conv and a 2x2/2 VALID pool."""
    return (size - 2) // 2


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)  # NHWC order, as keras.layers.Flatten


class _Sequential(nnx.Module):
    """The Keras layer sequence in `layers()`; `__call__` runs the same maths in fewer passes."""

    def convs(self) -> list[Conv3x3]:
        raise NotImplementedError

    def layers(self, dropout_key: jax.Array | None = None) -> list[tuple[str, Callable]]:
        """The Keras layers by name: conv/pool pairs, flatten, dense1, dropout, logits."""
        result = []
        for i, conv in enumerate(self.convs(), start=1):
            result += [
                (f"conv{i}", lambda x, conv=conv: nnx.relu(conv(x))),
                (f"pool{i}", ops.max_pool_2x2),
            ]
        return result + [
            ("flatten", _flatten),
            ("dense1", lambda x: nnx.relu(self.dense1(x))),
            ("dropout", self._dropout(dropout_key)),
            ("logits", self.logits),
        ]

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None, mask=None):
        """Logits for NHWC images; dropout runs only when a key is given. `mask` (which rows
        of the batch are images, not padding) matters only to batch norm: none here."""
        for conv in self.convs():
            x = conv.pooled_relu(x) if self.pool_first else ops.max_pool_2x2(nnx.relu(conv(x)))
        x = nnx.relu(self.dense1(_flatten(x)))
        return self.logits(self._dropout(dropout_key)(x))

    def outputs(self, x: jax.Array) -> list[tuple[str, jax.Array]]:
        """Every Keras layer's output in turn, for layer-by-layer comparisons with Keras."""
        result = []
        for name, layer in self.layers(None):
            x = layer(x)
            result.append((name, x))
        return result

    def _dropout(self, dropout_key):
        return lambda x: self.dropout(x, deterministic=dropout_key is None, rngs=dropout_key)


class Model1(_Sequential):
    """Conv2D(32) -> MaxPool -> Flatten -> Dense(128) -> Dropout(0.5) -> Dense(classes)."""

    def __init__(self, image_size, num_classes, *, dropout=0.5, layers=_Layers(), rngs):
        side = _after_block(image_size)
        self.pool_first = layers.pool_first
        self.conv1 = layers.conv3x3(3, 32, rngs)
        self.dense1 = layers.dense(side * side * 32, 128, rngs)
        self.dropout = nnx.Dropout(dropout)
        self.logits = layers.dense(128, num_classes, rngs)

    def convs(self):
        return [self.conv1]


class Model2(_Sequential):
    """Two Conv2D/MaxPool blocks (32, 64) -> Flatten -> Dense(128) -> Dropout(0.5) -> Dense."""

    def __init__(self, image_size, num_classes, *, dropout=0.5, layers=_Layers(), rngs):
        side = _after_block(_after_block(image_size))
        self.pool_first = layers.pool_first
        self.conv1 = layers.conv3x3(3, 32, rngs)
        self.conv2 = layers.conv3x3(32, 64, rngs)
        self.dense1 = layers.dense(side * side * 64, 128, rngs)
        self.dropout = nnx.Dropout(dropout)
        self.logits = layers.dense(128, num_classes, rngs)

    def convs(self):
        return [self.conv1, self.conv2]


class Model3(nnx.Module):
    """Three blocks of two [Conv2D(3x3, "same", no bias) -> BatchNorm -> ReLU], then MaxPool,
    with 32, 64 and 128 filters (times `width`), then Flatten -> Dense(256) -> Dropout ->
    Dense(classes).

    Not from the tutorial: a small VGG-style CNN for the task. Batch normalisation lets it train
    fast at a high learning rate; "same" padding keeps the borders, where a sign's rim is. The
    second convolution of each block triples the step on a 2-core CPU, and pays (README).
    """

    WIDTHS = (32, 64, 128)

    def __init__(self, image_size, num_classes, *, dropout=0.5, layers=_Layers(), stn=False,
                 width=1.0, rngs):  # fmt: skip
        widths = tuple(round(w * width) for w in self.WIDTHS)  # `--width`
        ins = (3,) + widths[:-1]
        # The creation order fixes which weights a seed draws; it is the order the README's
        # figures were measured with: each block's first convolution, the head, then the
        # blocks' second convolutions.
        first = [layers.first_conv] + [None] * (len(ins) - 1)
        self.convs = nnx.List(
            [layers.conv3x3(a, b, rngs, use_bias=False, conv=f)
             for a, b, f in zip(ins, widths, first)]
        )  # fmt: skip
        self.norms = nnx.List([_batch_norm(b, layers, rngs) for b in widths])
        side = image_size
        for _ in widths:
            side //= 2
        self.dense1 = layers.dense(side * side * widths[-1], 256, rngs)
        self.dropout = nnx.Dropout(dropout)
        self.logits = layers.dense(256, num_classes, rngs)
        self.convs2 = nnx.List([layers.conv3x3(b, b, rngs, use_bias=False) for b in widths])
        self.norms2 = nnx.List([_batch_norm(b, layers, rngs) for b in widths])
        # Drawn last, so that a seed gives the classifier the weights it has without it.
        self.stn = SpatialTransformer(image_size, layers.dtype, rngs) if stn else None

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None, mask=None):
        """Logits; with a dropout key it trains (batch statistics, updating the running ones).

        `mask` (batch,) marks the rows that are images: the padding of an epoch's last batch
        then takes no part in the batch statistics, so it changes neither the update of the
        real images nor the running statistics.
        """
        running = dropout_key is None
        if self.stn is not None:
            x = self.stn(x)
        for block in zip(self.convs, self.norms, self.convs2, self.norms2):
            for conv, norm in (block[:2], block[2:]):
                x = nnx.relu(ops.batch_norm(norm, conv.same(x), not running, mask))
            x = ops.max_pool_2x2(x)
        x = nnx.relu(self.dense1(_flatten(x)))
        return self.logits(self.dropout(x, deterministic=running, rngs=dropout_key))


def _batch_norm(features: int, layers: _Layers, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # Keras' BatchNormalization defaults: momentum 0.99, epsilon 1e-3 (Flax's is 1e-5).
    return nnx.BatchNorm(features, epsilon=1e-3, dtype=layers.dtype, rngs=rngs)


DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
MODELS: dict[int, Callable[..., nnx.Module]] = {1: Model1, 2: Model2, 3: Model3}


def trains_with_onednn(
    model: int, conv: str, dtype: str, platform: str = "cpu", devices: int = 1
) -> bool:
    """Whether a run computes its convolutions with oneDNN: on one CPU device (on several,
    GSPMD would give each the whole batch's), asked to, or Model 3 at 'auto' in float32 (all
    they take) where the onednn extra is installed."""
    auto = model == 3 and conv == "auto" and dtype == "float32"
    one_cpu = platform == "cpu" and devices == 1
    return one_cpu and (conv == "onednn" or (auto and onednn.available()))


def _model3_convs(conv: str, dtype: str, platform: str | None, devices: int):
    """Model 3's 'auto': oneDNN's convolutions where `trains_with_onednn`, else XLA's own for
    its "same" layers and, on CPU, the matmul form for the first (3 input channels), where
    XLA's forward and gradients took 4.7x as long."""
    if conv != "auto":
        return conv, None
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return "lax", None
    if trains_with_onednn(3, conv, dtype, platform, devices):
        return "onednn", None
    return "lax", ops.resolve_conv("auto", platform)


def create_model(
    model: int,
    image_size: int = 30,
    num_classes: int = 43,
    seed: int | jax.Array = 0,
    dropout: float = 0.5,
    conv: str = "auto",
    dtype: str = "float32",
    platform: str | None = None,
    stn: bool = False,
    width: float = 1.0,
    looped: bool = False,
    devices: int = 1,
):
    """Builds Model 1, 2 or 3 with weights drawn from `seed` (an int or a PRNG key).

    dropout=0 switches dropout off; `conv` picks the convolution's formulation (ops.CONVS; 'auto'
    by `platform`, the one the model will run on) and `dtype` the compute type ('float32' or
    'bfloat16'; parameters stay float32). `stn` puts a spatial transformer in front of Model 3,
    and `width` multiplies its filters.
    `looped`: it trains inside a compiled loop (`--steps-per-call` above 1; ops.resolve_conv).
    `devices`: how many it runs on (Model 3's 'auto' on CPU, `_model3_convs`).
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    conv, first = _model3_convs(conv, dtype, platform, devices) if model == 3 else (conv, None)
    conv_fn = ops.resolve_conv(conv, platform, looped)
    layers = _Layers(conv_fn, DTYPES[dtype], pool_first=conv_fn is ops.conv3x3_matmul,
                     first_conv=first)  # fmt: skip
    if model not in MODELS:
        raise UserError(f"unknown model {model!r}: choose one of {', '.join(map(str, MODELS))}")
    if image_size < min_image_size(model):
        raise UserError(
            f"image size {image_size} is too small for model {model}: it needs at least "
            f"{min_image_size(model)}"
        )
    if stn and model != 3:
        raise UserError(f"a spatial transformer is for model 3 only, not model {model}")
    if width != 1 and model != 3:
        raise UserError(f"a width is for model 3 only, not model {model}")
    extra = dict(stn=stn, width=width) if model == 3 else {}  # Model 3's alone, checked above
    rngs = nnx.Rngs(params=seed)
    return MODELS[model](
        image_size, num_classes, dropout=dropout, layers=layers, rngs=rngs, **extra
    )


def min_image_size(model: int) -> int:
    """The smallest input side that leaves each block at least one pixel."""
    return MIN_IMAGE_SIZE[model]


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars."""
    params = nnx.state(model, nnx.Param)
    return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))
