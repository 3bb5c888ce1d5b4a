"""Each export format of one run against the predictor and Keras, on this machine's CPU.

    pip install -e ".[export,keras]"
    python scripts/bench_export.py runs/m2            # the per-format table in BENCHMARKS.md

For every format and quantization: file size, the self-check on the run's test split
(accuracy, top-1 agreement, largest difference), batch-1 latency (median of 300 calls on one
test image) and batch-256 throughput (the test split in batches of 256, best of 3; TFLite and
ONNX exported again at a static batch of 256 for it). Beside them the predictor
(`Predictor.probabilities`), Keras' `predict` and Keras' own TFLite and ONNX exports of the
same weights (float input: the pixel scaling done outside, in NumPy, and not timed).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cnn_jax.data import scale_pixels
from cnn_jax.errors import UserError
from cnn_jax.export import Request, export, formats
from cnn_jax.inference import evaluation_data, in_batches, load_checkpoint

KINDS = [("jax", None), ("tflite", None), ("tflite", "float16"), ("tflite", "int8"),
         ("onnx", None), ("onnx", "int8")]  # fmt: skip


def latency_ms(run, image, calls=300) -> float:
    run(image)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run(image)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def throughput(run, images, batch=256, rounds=3) -> float:
    in_batches(run, images[:batch], batch)
    best = min(_timed(lambda: in_batches(run, images, batch)) for _ in range(rounds))
    return len(images) / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def row(name, size, b1, b256, check=None) -> str:
    figures = "" if check is None else (
        f"  accuracy {check['accuracy']:.4f}  agreement {check['top1_agreement']:.4f}  "
        f"max diff {check['max_abs_difference']:.1e}"
    )  # fmt: skip
    mb = f"{size / 1e6:6.2f} MB" if size else "    -    "
    return f"{name:<22} {mb}  batch 1 {b1:6.3f} ms  batch 256 {b256:9,.0f} img/s{figures}"


def bench_formats(run_dir, images, tmp: Path) -> None:
    for fmt, q in KINDS:
        name = fmt + (f" {q}" if q else "")
        try:
            sidecar, b1, b256 = _bench_format(run_dir, images, tmp, fmt, q)
        except UserError as e:  # the self-check refused it: that is a result too
            print(f"{name:<22} refused: {e}", flush=True)
            continue
        print(row(name, sidecar["bytes"], b1, b256, sidecar["self_check"]), flush=True)


def _bench_format(run_dir, images, tmp: Path, fmt: str, q):
    out = tmp / f"{fmt}-{q}{formats.SUFFIXES[fmt]}"
    sidecar = export(run_dir, out, Request(fmt, q))
    one = formats.RUNNERS[fmt](out.read_bytes())
    b1, b256 = latency_ms(one, images[:1]), float("nan")
    if fmt == "jax":
        return sidecar, b1, throughput(one, images)
    wide = tmp / f"{fmt}-{q}-256{formats.SUFFIXES[fmt]}"
    try:
        export(run_dir, wide, Request(fmt, q, batch=256, check_images=512))
        b256 = throughput(formats.RUNNERS[fmt](wide.read_bytes()), images)
    except UserError as e:
        print(f"{fmt} {q} at batch 256 refused: {e}", flush=True)
    return sidecar, b1, b256


def bench_keras(restored, images, labels, tmp: Path) -> None:
    import tensorflow as tf

    from keras_ref.convert import to_keras

    net = to_keras(restored.directory)
    x = scale_pixels(images, restored.config.pixels)
    keras_run = lambda batch: net.predict_on_batch(batch)  # noqa: E731
    b256 = len(x) / min(_timed(lambda: net.predict(x, batch_size=256, verbose=0)) for _ in range(3))
    print(row("keras predict", 0, latency_ms(keras_run, x[:1]), b256), flush=True)
    lite = tf.lite.TFLiteConverter.from_keras_model(net).convert()
    (tmp / "keras.tflite").write_bytes(lite)
    one = formats.tflite_runner(lite)
    accuracy = np.mean(in_batches(one, x, 1).argmax(1) == labels)
    print(row("keras tflite", len(lite), latency_ms(one, x[:1]), float("nan")) +
          f"  accuracy {accuracy:.4f}", flush=True)  # fmt: skip
    try:
        net.export(str(tmp / "keras.onnx"), format="onnx", verbose=False)
    except Exception as e:  # Keras' exporter is optional here: say why, keep the table
        print(f"keras onnx: export failed: {type(e).__name__}: {str(e)[:200]}")
        return
    run = formats.onnx_runner((tmp / "keras.onnx").read_bytes())
    accuracy = np.mean(in_batches(run, x, 256).argmax(1) == labels)
    print(row("keras onnx", (tmp / "keras.onnx").stat().st_size, latency_ms(run, x[:1]),
              throughput(run, x)) + f"  accuracy {accuracy:.4f}", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained run's folder")
    p.add_argument("--no-keras", action="store_true", help="leave Keras' side out")
    args = p.parse_args()
    restored = load_checkpoint(args.run, "cpu")
    ds, idx, source = evaluation_data(restored, None, "auto", None)
    images, labels = ds.images[idx], ds.labels[idx]
    print(f"{args.run}: model {restored.config.model}, {len(labels):,} images of {source}")
    predictor = lambda b: np.asarray(restored.predictor.probabilities(restored.params, b))  # noqa: E731
    print(
        row(
            "cnn-jax predictor", 0, latency_ms(predictor, images[:1]), throughput(predictor, images)
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        bench_formats(args.run, images, Path(tmp))
        if not args.no_keras:
            bench_keras(restored, images, labels, Path(tmp))
    print(f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
