"""The tutorial's Model 1 and Model 2, and Model 3, in Keras 3, layer for layer as in
cnn_jax/models.py."""

import keras
from keras import layers

from cnn_jax.errors import UserError


def create_model(model: int, image_size: int = 30, num_classes: int = 43) -> keras.Sequential:
    """The tutorial's `get_model()`, compiled as it compiles it (Model 3: cnn_jax's)."""
    if model not in (1, 2, 3):
        raise UserError(f"unknown model {model!r}: choose 1, 2 or 3")
    if model == 3:
        return _model3(image_size, num_classes)
    blocks = [
        layers.Conv2D(32, (3, 3), activation="relu", name="conv1"),
        layers.MaxPooling2D(pool_size=(2, 2), name="pool1"),
    ]
    if model == 2:
        blocks += [
            layers.Conv2D(64, (3, 3), activation="relu", name="conv2"),
            layers.MaxPooling2D(pool_size=(2, 2), name="pool2"),
        ]
    return _sequential(f"model{model}", image_size, blocks, 128, num_classes)


def _model3(image_size: int, num_classes: int) -> keras.Sequential:
    blocks = []
    for i, filters in enumerate((32, 64, 128), start=1):
        for j in "ab":
            blocks += [
                layers.Conv2D(filters, (3, 3), padding="same", use_bias=False, name=f"conv{i}{j}"),
                # Keras' defaults, which cnn_jax's Model 3 copies: momentum 0.99, epsilon 1e-3.
                layers.BatchNormalization(name=f"norm{i}{j}"),
                layers.ReLU(name=f"relu{i}{j}"),
            ]
        blocks.append(layers.MaxPooling2D(pool_size=(2, 2), name=f"pool{i}"))
    return _sequential("model3", image_size, blocks, 256, num_classes)


def _sequential(name, image_size, blocks, hidden, num_classes) -> keras.Sequential:
    """Input, the conv blocks, then the head every model shares, compiled as the tutorial does:
    Flatten, Dense(hidden, relu), Dropout(0.5), Dense(classes, softmax)."""
    net = keras.Sequential(
        [
            keras.Input(shape=(image_size, image_size, 3)),
            *blocks,
            layers.Flatten(name="flatten"),
            layers.Dense(hidden, activation="relu", name="dense1"),
            layers.Dropout(0.5, name="dropout"),
            layers.Dense(num_classes, activation="softmax", name="logits"),
        ],
        name=name,
    )
    compile_model(net)
    return net


def compile_model(net: keras.Model, learning_rate: float = 1e-3) -> None:
    net.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )


def logits_model(net: keras.Model) -> keras.Model:
    """A copy of `net` whose last layer has no softmax: its pre-softmax outputs."""
    copy = keras.models.clone_model(net)
    copy.set_weights(net.get_weights())
    copy.layers[-1].activation = keras.activations.linear
    return copy
