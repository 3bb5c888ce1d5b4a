"""Classifies photos with a network from `cnn-jax export`, using only its runtime, Pillow and
NumPy: what a phone, a board or a server runs, with no cnn_jax, JAX or TensorFlow.

    pip install ai-edge-litert pillow numpy      # or: onnxruntime pillow numpy
    python classify_exported.py model.tflite photo.png [photo.jpg ...]

The sidecar beside the model (model.tflite.json) says the image size, how training resized
and the sign names; the pixel scaling is inside the model.
"""

import json
import sys

import numpy as np
from PIL import Image


def resize_like_opencv(rgb: np.ndarray, size: int) -> np.ndarray:
    """cv2.resize(..., INTER_LINEAR): each pixel from its 2x2 nearest source pixels (pixel
    centres aligned, edges repeated). OpenCV rounds its weights to 11 bits: a level may differ
    by one here and there."""

    def axis(n):
        x = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        low = np.floor(x).astype(int)
        return low, np.minimum(low + 1, n - 1), (x - low).astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = axis(rgb.shape[0]), axis(rgb.shape[1])
    img = rgb.astype(np.float32)
    top = img[y0][:, x0] * (1 - fx[:, None]) + img[y0][:, x1] * fx[:, None]
    bottom = img[y1][:, x0] * (1 - fx[:, None]) + img[y1][:, x1] * fx[:, None]
    out = top * (1 - fy[:, None, None]) + bottom * fy[:, None, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def load_image(path: str, meta: dict) -> np.ndarray:
    rgb, size = Image.open(path).convert("RGB"), meta["image_size"]
    if meta["resize"]["decoder"] == "pillow":
        return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR))
    return resize_like_opencv(np.asarray(rgb), size)


def runner(model: str):
    """A function from a uint8 batch to probabilities, in the model's own runtime."""
    if model.endswith(".tflite"):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=model)
        interpreter.allocate_tensors()
        into, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

        def run(batch):
            interpreter.set_tensor(into["index"], batch)
            interpreter.invoke()
            return interpreter.get_tensor(out["index"])

        return run
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def classify(model: str, photos: list[str], top: int = 3) -> list[tuple[str, list]]:
    with open(model + ".json") as f:
        meta = json.load(f)
    run, batch = runner(model), meta["input"]["shape"][0]
    results = []
    for path in photos:
        image = load_image(path, meta)[None]
        probs = run(np.repeat(image, batch, axis=0))[0]  # a static batch: the first row is ours
        best = np.argsort(-probs, kind="stable")[:top]
        names = [meta["classes"][c]["name"] for c in best]
        results.append((path, [(int(c), n, float(probs[c])) for c, n in zip(best, names)]))
    return results


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    for path, best in classify(sys.argv[1], sys.argv[2:]):
        print(path)
        for rank, (c, name, p) in enumerate(best, start=1):
            print(f"  {rank}. {p:7.2%}  {name} (class {c})")
