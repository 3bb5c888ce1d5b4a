"""`cnn-jax export`: a checkpoint as a file another runtime runs, tried in that runtime on the
run's test split before anything is written, with a JSON sidecar that says how to feed it.

One contract for every format: uint8 RGB images (batch, size, size, 3), resized as training
resized them, in; class probabilities (batch, classes) out; the pixel scaling inside.
"""

import dataclasses
import importlib.metadata
import json
from pathlib import Path

import numpy as np

from cnn_jax import files
from cnn_jax.errors import UserError
from cnn_jax.export import formats
from cnn_jax.export.formats import FORMATS, QUANTIZE, SUFFIXES

__all__ = ["FORMATS", "QUANTIZE", "Request", "export", "sidecar_path"]

FLOAT_TOLERANCE = 1e-5  # largest difference of a probability from the predictor's
AGREEMENT = 0.99  # smallest share of top-1 predictions a quantized network must keep
CALIBRATION_IMAGES = 128  # training images int8 calibrates on
RESIZE = {
    "opencv": "cv2.imread, BGR to RGB, cv2.resize to size x size with INTER_LINEAR (bilinear "
    "on the 2x2 nearest pixels, no smoothing)",
    "pillow": "Pillow Image.convert('RGB').resize((size, size), Image.BILINEAR)",
}
_RUNTIME_PACKAGES = {"jax": ["jax"], "tflite": ["tensorflow-cpu", "ai-edge-litert"],
                     "onnx": ["tensorflow-cpu", "tf2onnx", "onnx", "onnxruntime"]}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Request:
    fmt: str | None = None  # None: from OUT's suffix
    quantize: str | None = None
    batch: int = 1  # the static batch of tflite and onnx
    data: str | None = None  # images to check on instead of the run's test split
    check_images: int | None = None  # a seeded sample of that many; None: all
    force: bool = False


def sidecar_path(out) -> Path:
    return Path(f"{out}.json")


def export(checkpoint, out, request: Request = Request(), cache_dir=None) -> dict:
    """Writes `out` and its sidecar, or nothing when the self-check fails; the sidecar's
    contents."""
    out = Path(out)
    fmt = _check_request(out, request)
    from cnn_jax.inference import load_checkpoint

    restored = load_checkpoint(checkpoint, "cpu")
    files.refuse_inside(out, restored.directory.parent, "the checkpoints folder")
    images, labels, calibration, source = _check_set(restored, request, cache_dir)
    artifact, shape = _build(restored, fmt, request, calibration)
    check = _self_check(restored, fmt, artifact, shape, images, labels, request.quantize, source)
    sidecar = _describe(restored, fmt, request.quantize, shape, len(artifact), check)
    files.write_whole(out, artifact)
    files.write_whole(sidecar_path(out), json.dumps(sidecar, indent=1) + "\n")
    return sidecar


def _check_request(out: Path, r: Request) -> str:
    fmt = r.fmt or next((f for f, s in SUFFIXES.items() if out.suffix == s), None)
    if fmt is None:
        raise UserError(
            f"cannot tell the format from {out.name}: give --format ({', '.join(FORMATS)})"
        )
    if out.suffix != SUFFIXES[fmt]:
        raise UserError(f"a {fmt} export's file ends in {SUFFIXES[fmt]}, not {out.name}")
    if r.quantize and r.quantize not in QUANTIZE[fmt]:
        can = ", ".join(f for f, q in QUANTIZE.items() if r.quantize in q)
        raise UserError(f"--quantize {r.quantize} is not available for {fmt}: use --format {can}")
    if fmt == "jax" and r.batch != 1:
        raise UserError("--batch is for tflite and onnx: a jax export takes any batch size")
    if r.batch < 1 or (r.check_images is not None and r.check_images < 1):
        raise UserError("--batch and --check-images must be at least 1")
    if not out.parent.is_dir():  # found now, not after minutes of converting
        raise UserError(f"{out.parent} is not a folder: give OUT in an existing one")
    files.refuse_existing(out, r.force)
    files.refuse_existing(sidecar_path(out), r.force)
    return fmt


def _check_set(restored, r: Request, cache_dir):
    """(images, labels) to check on, training images to calibrate on, and what they are."""
    from cnn_jax.data import split_run
    from cnn_jax.inference import evaluation_data

    ds, idx, source = evaluation_data(restored, r.data, "auto", cache_dir)
    train = idx if r.data else split_run(restored.config, ds)[0]
    rng = np.random.default_rng(0)
    if r.check_images is not None and r.check_images < len(idx):
        idx = np.sort(rng.choice(idx, r.check_images, replace=False))
        source = f"{r.check_images} images (seed 0) of {source}"
    calibration = rng.permutation(train)[: max(CALIBRATION_IMAGES, r.batch)]  # a batch at least
    return ds.images[idx], ds.labels[idx], ds.images[calibration], source


def _build(restored, fmt: str, r: Request, calibration: np.ndarray):
    """The artifact's bytes, and its input shape (None for the batch: any)."""
    from cnn_jax.export.graph import serving_function

    size = restored.config.image_size
    fn = serving_function(restored.predictor, restored.params, portable=fmt != "jax")
    if fmt == "jax":
        return formats.jax_bytes(fn, size), (None, size, size, 3)
    shape = (r.batch, size, size, 3)
    batches = [
        calibration[i : i + r.batch] for i in range(0, len(calibration) - r.batch + 1, r.batch)
    ]
    if fmt == "tflite":
        return formats.tflite_bytes(fn, shape, r.quantize, batches), shape
    return formats.onnx_bytes(formats.tflite_bytes(fn, shape), r.quantize, batches), shape


def _self_check(restored, fmt, artifact, shape, images, labels, quantize, source) -> dict:
    """The artifact in its own runtime against the predictor, on the same images."""
    from cnn_jax.inference import EVAL_BATCH, in_batches, probabilities

    expected = probabilities(restored, images)
    got = in_batches(formats.RUNNERS[fmt](artifact), images, shape[0] or EVAL_BATCH)
    agree = float(np.mean(got.argmax(1) == expected.argmax(1)))
    figures = {
        "images": source,
        "n": len(labels),
        "max_abs_difference": float(np.abs(got - expected).max()),
        "top1_agreement": agree,
        "accuracy": float(np.mean(got.argmax(1) == labels)),
        "checkpoint_accuracy": float(np.mean(expected.argmax(1) == labels)),
    }
    figures["accuracy_change"] = figures["accuracy"] - figures["checkpoint_accuracy"]
    if quantize:
        passed = agree >= AGREEMENT
        bound = f"top-1 agreement {agree:.2%}, needs {AGREEMENT:.0%}"
    else:
        passed = figures["max_abs_difference"] <= FLOAT_TOLERANCE and agree == 1.0
        bound = (f"largest difference {figures['max_abs_difference']:.3g} (at most "
                 f"{FLOAT_TOLERANCE:g}), top-1 agreement {agree:.2%} (needs all)")  # fmt: skip
    if not passed:
        raise UserError(
            f"the {fmt}{' ' + quantize if quantize else ''} export disagrees with the checkpoint "
            f"on {source}: {bound}; nothing written"
        )
    return figures


def _describe(restored, fmt, quantize, shape, size, check) -> dict:
    from cnn_jax.checkpoint import params_digest
    from cnn_jax.data.signs import sign_name

    cfg, classes = restored.config, restored.meta.num_classes
    return {
        "format": fmt,
        "quantize": quantize,
        "bytes": size,
        "input": {
            "shape": ["batch" if d is None else d for d in shape],
            "dtype": "uint8",
            "layout": "NHWC",
            "channels": "RGB",
            "values": "0..255",
        },  # fmt: skip
        "output": {
            "shape": [shape[0] or "batch", classes],
            "dtype": "float32",
            "values": "class probabilities (softmax; an ensemble's mean)",
        },  # fmt: skip
        "image_size": cfg.image_size,
        "resize": {"decoder": cfg.decoder, "how": RESIZE[cfg.decoder]},
        "pixels": {"scaling": cfg.pixels, "inside_the_graph": True},
        "classes": [{"id": c, "name": sign_name(c)} for c in range(classes)],
        "model": cfg.model,
        "spatial_transformer": cfg.stn,
        "width": cfg.width,
        "ensemble": cfg.ensemble,
        "checkpoint": {
            "path": str(restored.directory),
            "step": restored.step,
            "params_sha256": params_digest(restored.params),
        },  # fmt: skip
        "versions": {
            p: importlib.metadata.version(p) for p in ["cnn-jax", *_RUNTIME_PACKAGES[fmt]]
        },
        "self_check": check,
    }
