"""Weights across the border: Keras `.keras`/`.h5` files <-> cnn_jax orbax checkpoints.

Keras and Flax share kernel layouts (conv HWIO, dense (in, out)) and Flatten's NHWC order, so
every array copies as it is, matched by position in the model.
"""

import zipfile
from pathlib import Path

import keras
import numpy as np
from flax import nnx

from cnn_jax.checkpoint import Checkpoints
from cnn_jax.config import PIXELS, Config
from cnn_jax.errors import UserError
from cnn_jax.inference import load_checkpoint
from cnn_jax.models import Model3
from cnn_jax.run_meta import RunMeta
from cnn_jax.steps import create_trainer
from keras_ref.models import create_model

# What must match, per layer type, for a Keras layer to be the tutorial's. Dropout's rate and
# the last layer's activation do not change which network it is.
_SIGNATURE = {
    "Conv2D": ("filters", "kernel_size", "strides", "padding", "activation", "use_bias"),
    "MaxPooling2D": ("pool_size", "strides", "padding"),
    "Flatten": (),
    "Dense": ("units", "activation", "use_bias"),
    "Dropout": (),
    "BatchNormalization": ("epsilon", "center", "scale"),
    "ReLU": ("max_value", "negative_slope", "threshold"),
}
MODELS = (1, 2, 3)


class ConversionError(UserError):
    """A Keras file that is not one of the two networks, or cannot be read."""


def _describe(layer) -> str:
    cfg = layer.get_config()
    keys = _SIGNATURE.get(type(layer).__name__, ())
    return f"{type(layer).__name__}(" + ", ".join(f"{k}={cfg.get(k)!r}" for k in keys) + ")"


def _first_difference(net: keras.Model, ref: keras.Model) -> str | None:
    """None when `net` has `ref`'s architecture; else a sentence about the first difference."""
    got, want = net.layers, ref.layers
    for i, w in enumerate(want):
        if i >= len(got):
            return f"it ends after {len(got)} layers, where {w.name} = {_describe(w)} should follow"
        g = got[i]
        keys = _SIGNATURE[type(w).__name__]
        if i == len(want) - 1:
            keys = tuple(k for k in keys if k != "activation")
        same_type = type(g).__name__ == type(w).__name__
        if not same_type or any(g.get_config().get(k) != w.get_config().get(k) for k in keys):
            return f"layer {i + 1} ({g.name!r}) is {_describe(g)}, expected {_describe(w)}"
    if len(got) > len(want):
        return f"it has {len(got) - len(want)} extra layers from {got[len(want)].name!r} on"
    return None


def identify(net: keras.Model) -> int:
    """1, 2 or 3: which network `net` is, by its layers (names do not matter)."""
    shape = net.input_shape
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise ConversionError(f"input shape {shape} is not (None, S, S, 3)")
    num_classes = net.layers[-1].get_config().get("units")
    differences = {}
    for model in MODELS:
        try:
            ref = create_model(model, shape[1], num_classes or 1)
        except ValueError as e:
            differences[model] = str(e)
            continue
        differences[model] = _first_difference(net, ref)
        if differences[model] is None:
            return model
    # Name the difference of the closer candidate: the one whose first block matches longer.
    if any(type(layer).__name__ == "BatchNormalization" for layer in net.layers):
        model = 3
    else:
        model = 2 if len(net.layers) > 6 else 1
    who = "Model 3" if model == 3 else f"the tutorial's Model {model}"
    raise ConversionError(f"not {who}: {differences[model]}")


# Model 3's arrays in Keras' order per layer, by the names cnn_jax gives them.
_CONV3 = ("kernel",)
_NORM3 = ("scale", "bias", "mean", "var")  # gamma, beta, moving mean, moving variance
_STATS = ("mean", "var")


def _layer_names(model: int) -> list[tuple[str, tuple[str, ...]]]:
    """(cnn_jax path, array names) of each Keras layer that has weights, in order."""
    dense = [("dense1", ("kernel", "bias")), ("logits", ("kernel", "bias"))]
    if model == 3:
        # Keras' order: conv1a, norm1a, conv1b, norm1b, conv2a, ...
        return [
            (f"{kind}{second}/{i}", names)
            for i in range(len(Model3.WIDTHS))
            for second in ("", "2")
            for kind, names in (("convs", _CONV3), ("norms", _NORM3))
        ] + dense
    return [(f"conv{i}", ("kernel", "bias")) for i in range(1, model + 1)] + dense


def keras_weights(net: keras.Model, model: int) -> dict[str, dict[str, np.ndarray]]:
    """{'conv1': {'kernel', 'bias'}, ...} from a Keras model of the given architecture
    (Model 3: {'convs/0': {'kernel'}, 'norms/0': {'scale', 'bias', 'mean', 'var'},
    'convs2/0': ..., 'norms2/0': ..., 'convs/1': ...})."""
    layers = [layer for layer in net.layers if layer.weights]
    return {
        path: {name: np.asarray(w.numpy()) for name, w in zip(names, layer.weights, strict=True)}
        for (path, names), layer in zip(_layer_names(model), layers, strict=True)
    }


def set_keras_weights(state, net: keras.Model, model: int) -> None:
    """Overwrites the state's parameters and batch statistics in place with the Keras model's."""
    params, stats = nnx.to_pure_dict(state.params), nnx.to_pure_dict(state.batch_stats)
    for path, arrays in keras_weights(net, model).items():
        for name, value in arrays.items():
            tree = stats if name in _STATS else params
            for key in path.split("/"):
                tree = tree[int(key) if key.isdigit() else key]
            tree[name] = value
    nnx.replace_by_pure_dict(state.params, params)
    if stats:
        nnx.replace_by_pure_dict(state.batch_stats, stats)


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(magic)) == magic


def load_keras(path: Path | str) -> keras.Model:
    """A `.keras` or legacy `.h5` file, loaded in Keras' safe mode (no code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    if path.suffix not in (".keras", ".h5"):
        raise ConversionError(f"{path} is not a .keras or .h5 file")
    # Keras answers "File not found" for a file that exists but is not a model archive.
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ConversionError(f"{path} is not a Keras model: a .keras file is a zip archive")
    if path.suffix == ".h5" and not _starts_with(path, b"\x89HDF\r\n\x1a\n"):
        raise ConversionError(f"{path} is not a Keras model: a .h5 file is an HDF5 file")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many kinds for damaged or foreign files
        raise ConversionError(f"cannot load {path}: {str(e).strip().splitlines()[0]}") from None


def import_keras(path: Path | str, ckpt_dir: Path | str, pixels: str = "raw") -> Path:
    """Writes the Keras model at `path` as a cnn_jax checkpoint (step 0) in `ckpt_dir`."""
    if pixels not in PIXELS:
        raise ConversionError(f"unknown pixel scaling {pixels!r}: choose {', '.join(PIXELS)}")
    net = load_keras(path)
    model = identify(net)
    num_classes = int(net.layers[-1].get_config()["units"])
    config = Config(
        model=model,
        image_size=int(net.input_shape[1]),
        num_classes=num_classes,
        pixels=pixels,
        epochs=0,
        # An imported model is evaluated as Keras computes it: full float32 products, not TF32.
        precision="highest",
    )
    trainer, state = create_trainer(config, num_classes)
    set_keras_weights(state, net, model)
    store = Checkpoints(ckpt_dir)
    if store.steps():
        raise ConversionError(f"{store.directory} already holds checkpoints: choose a new folder")
    meta = RunMeta.for_run(config, num_classes, 0, 0, [], imported_from=str(Path(path).resolve()))
    store.save(0, state, meta)
    store.close()
    return store.directory / "0"


def to_keras(ckpt: Path | str) -> keras.Model:
    """The checkpoint's network as a compiled Keras model with its weights."""
    restored = load_checkpoint(ckpt)
    cfg = restored.config
    if cfg.ensemble > 1:
        raise ConversionError(
            f"export-keras writes one network, and this is an ensemble of {cfg.ensemble}"
        )
    if cfg.stn:
        raise ConversionError("the Keras reference has no spatial transformer (--stn)")
    if cfg.width != 1:
        raise ConversionError(f"the Keras reference has Model 3's widths, not --width {cfg.width}")
    net = create_model(cfg.model, cfg.image_size, restored.meta.num_classes)
    weights = nnx.to_pure_dict(restored.params)
    layers = [layer for layer in net.layers if layer.weights]
    for (path, names), layer in zip(_layer_names(cfg.model), layers, strict=True):
        tree = weights
        for key in path.split("/"):
            tree = tree[int(key) if key.isdigit() else key]
        layer.set_weights([np.asarray(tree[name]) for name in names])
    return net


def export_keras(ckpt: Path | str, out: Path | str) -> Path:
    """Saves the checkpoint's network as a `.keras` (or `.h5`) file."""
    out = Path(out)
    if out.suffix not in (".keras", ".h5"):
        raise ConversionError(f"{out} must end in .keras or .h5")
    if out.exists():
        raise ConversionError(f"{out} exists: not overwriting it")
    net = to_keras(ckpt)
    # A compiled model whose optimizer was never built saves 2 optimizer variables and then
    # fails to load into the 18 that loading builds; building it first keeps the file loadable.
    net.optimizer.build(net.trainable_variables)
    net.save(out)
    return out
