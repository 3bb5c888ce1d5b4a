"""The tutorial's two traffic-sign CNNs as Flax NNX modules.

Layer names (conv1, conv2, dense1, logits) match the Keras reference so weights map name to name.
The models return logits; softmax lives in the loss and in predict.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Keras' Conv2D and Dense default to glorot_uniform kernels and zero biases
# (keras/src/layers/convolutional/base_conv.py, keras/src/layers/core/dense.py); Flax defaults
# to lecun_normal, which trains differently with raw 0..255 pixels.
_KERNEL_INIT = nnx.initializers.glorot_uniform()
_BIAS_INIT = nnx.initializers.zeros_init()


def _conv(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Conv:
    # Keras Conv2D pads "valid"; nnx.Conv defaults to 'SAME'. The tuple keeps the kernel 2-D.
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(3, 3),
        padding="VALID",
        kernel_init=_KERNEL_INIT,
        bias_init=_BIAS_INIT,
        rngs=rngs,
    )


def _dense(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, kernel_init=_KERNEL_INIT, bias_init=_BIAS_INIT, rngs=rngs
    )


def _pool(x: jax.Array) -> jax.Array:
    """Keras' MaxPooling2D((2, 2)): stride = pool size, "valid" (an odd last row is dropped).

    Written as reshape + max rather than `nnx.max_pool`: on CPU the gradient of `reduce_window`
    lowers to select-and-scatter, which doubled the whole training step. The values are the
    same; tests/test_models.py checks values and gradients against `nnx.max_pool`.
    """
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _after_block(size: int) -> int:
    """Spatial size after a 3x3 VALID conv and a 2x2/2 VALID pool."""
    return (size - 2) // 2


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)  # NHWC order, as keras.layers.Flatten


class _Sequential(nnx.Module):
    """Runs `layers()` in order; subclasses name their layers as the Keras models do."""

    def layers(self, dropout_key: jax.Array | None) -> list[tuple[str, Callable]]:
        raise NotImplementedError

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits for NHWC images; dropout runs only when a key is given."""
        for _, layer in self.layers(dropout_key):
            x = layer(x)
        return x

    def outputs(self, x: jax.Array) -> list[tuple[str, jax.Array]]:
        """Every layer's output, for layer-by-layer comparisons with Keras."""
        result = []
        for name, layer in self.layers(None):
            x = layer(x)
            result.append((name, x))
        return result

    def _dropout(self, dropout_key):
        return lambda x: self.dropout(x, deterministic=dropout_key is None, rngs=dropout_key)


class Model1(_Sequential):
    """Conv2D(32) -> MaxPool -> Flatten -> Dense(128) -> Dropout(0.5) -> Dense(classes)."""

    def __init__(self, image_size: int, num_classes: int, *, dropout=0.5, rngs: nnx.Rngs):
        side = _after_block(image_size)
        self.conv1 = _conv(3, 32, rngs)
        self.dense1 = _dense(side * side * 32, 128, rngs)
        self.dropout = nnx.Dropout(dropout)
        self.logits = _dense(128, num_classes, rngs)

    def layers(self, dropout_key=None):
        return [
            ("conv1", lambda x: nnx.relu(self.conv1(x))),
            ("pool1", _pool),
            ("flatten", _flatten),
            ("dense1", lambda x: nnx.relu(self.dense1(x))),
            ("dropout", self._dropout(dropout_key)),
            ("logits", self.logits),
        ]


class Model2(_Sequential):
    """Two Conv2D/MaxPool blocks (32, 64) -> Flatten -> Dense(128) -> Dropout(0.5) -> Dense."""

    def __init__(self, image_size: int, num_classes: int, *, dropout=0.5, rngs: nnx.Rngs):
        side = _after_block(_after_block(image_size))
        self.conv1 = _conv(3, 32, rngs)
        self.conv2 = _conv(32, 64, rngs)
        self.dense1 = _dense(side * side * 64, 128, rngs)
        self.dropout = nnx.Dropout(dropout)
        self.logits = _dense(128, num_classes, rngs)

    def layers(self, dropout_key=None):
        return [
            ("conv1", lambda x: nnx.relu(self.conv1(x))),
            ("pool1", _pool),
            ("conv2", lambda x: nnx.relu(self.conv2(x))),
            ("pool2", _pool),
            ("flatten", _flatten),
            ("dense1", lambda x: nnx.relu(self.dense1(x))),
            ("dropout", self._dropout(dropout_key)),
            ("logits", self.logits),
        ]


MODELS: dict[int, Callable[..., nnx.Module]] = {1: Model1, 2: Model2}


def create_model(
    model: int, image_size: int = 30, num_classes: int = 43, seed: int = 0, dropout: float = 0.5
):
    """Builds Model 1 or 2 with weights drawn from `seed`; dropout=0 switches dropout off."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: choose 1 or 2")
    if _after_block(_after_block(image_size) if model == 2 else image_size) < 1:
        raise ValueError(f"image size {image_size} is too small for model {model}")
    return MODELS[model](image_size, num_classes, dropout=dropout, rngs=nnx.Rngs(params=seed))


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars."""
    params = nnx.state(model, nnx.Param)
    return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))
