"""Each export format: the bytes of the artifact, and the artifact run in its own runtime.

`jax` needs nothing beyond the core (jax.export, batch symbolic, lowered for CPU and CUDA).
`tflite` goes JAX -> jax2tf -> TensorFlow Lite's converter and runs in ai-edge-litert; `onnx`
converts that TFLite graph with tf2onnx and runs in onnxruntime. Both take a static batch
(batch 1 is what ran fast on TFLite: a symbolic one made a graph 17x slower).
"""

import importlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from cnn_jax.errors import UserError

FORMATS = ("jax", "tflite", "onnx")
SUFFIXES = {"jax": ".jax", "tflite": ".tflite", "onnx": ".onnx"}
QUANTIZE = {"tflite": ("float16", "int8"), "onnx": ("int8",), "jax": ()}
EXTRAS = {"tflite": "tflite", "onnx": "onnx"}  # the pip extra each format needs
# (JAX is imported inside the functions: `cnn-jax --help` builds its options from this module.)
ONNX_OPSET = 17


def _need(module: str, fmt: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise UserError(
            f"--format {fmt} needs {package} ({e}): pip install 'cnn-jax[{EXTRAS[fmt]}]'"
        ) from None


def jax_bytes(fn: Callable, image_size: int) -> bytes:
    """jax.export's serialized artifact, for any batch size."""
    import jax
    import jax.numpy as jnp
    from jax import export

    shape = (*export.symbolic_shape("batch"), image_size, image_size, 3)
    exported = export.export(jax.jit(fn), platforms=("cpu", "cuda"))(
        jax.ShapeDtypeStruct(shape, jnp.uint8)
    )
    return bytes(exported.serialize())


def jax_runner(data: bytes) -> Callable:
    import jax
    from jax import export

    call = jax.jit(export.deserialize(bytearray(data)).call)  # traced once per batch shape
    return lambda images: np.asarray(call(images))


def _tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # its converter's log lines on stderr
    return _need("tensorflow", "tflite")


def tflite_bytes(fn: Callable, shape, quantize=None, calibration: Iterable = ()) -> bytes:
    """TensorFlow Lite flatbuffer of `fn` at a static input shape; float16 weights, or int8
    calibrated on `calibration` (batches of `shape`)."""
    tf = _tensorflow()
    from jax.experimental import jax2tf

    converted = tf.function(
        jax2tf.convert(fn, with_gradient=False),
        autograph=False,
        input_signature=[tf.TensorSpec(shape, tf.uint8)],
    )
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [converted.get_concrete_function()], converted
    )
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        batches = list(calibration)
        converter.representative_dataset = lambda: ([b] for b in batches)
    with warnings.catch_warnings():
        # int8: the uint8 input is cast to float inside the graph, so it has no quantization
        # statistics to expect; the converter warns that it continues without them.
        warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
        return converter.convert()


def tflite_runner(data: bytes) -> Callable:
    litert = _need("ai_edge_litert.interpreter", "tflite")
    interpreter = litert.Interpreter(model_content=data)
    interpreter.allocate_tensors()
    into = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]

    def run(images):
        interpreter.set_tensor(into, images)
        interpreter.invoke()
        return interpreter.get_tensor(out).copy()

    return run


def onnx_bytes(tflite: bytes, quantize=None, calibration: Iterable = ()) -> bytes:
    """ONNX of a float TFLite graph (tf2onnx reads TFLite's operators, which jax2tf's
    XlaCallModule is not); int8 by onnxruntime's static quantization."""
    tf2onnx = _need("tf2onnx", "onnx")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(tflite)
        with warnings.catch_warnings():
            # tf2onnx reads the flatbuffer's tensors with TensorFlow's own (deprecated)
            # interpreter; the graph it writes does not depend on it.
            warnings.filterwarnings("ignore", "(?s).*tf.lite.Interpreter is deprecated")
            model, _ = tf2onnx.convert.from_tflite(str(path), opset=ONNX_OPSET)
        if quantize == "int8":
            return _onnx_int8(model, list(calibration), Path(tmp))
    return model.SerializeToString()


def _onnx_int8(model, batches: list, tmp: Path) -> bytes:
    quantization = _need("onnxruntime.quantization", "onnx")
    (tmp / "float.onnx").write_bytes(model.SerializeToString())
    name = model.graph.input[0].name

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.rows = iter(batches)

        def get_next(self):
            batch = next(self.rows, None)
            return None if batch is None else {name: batch}

    quantization.quantize_static(
        str(tmp / "float.onnx"), str(tmp / "int8.onnx"), Reader(),
        quant_format=quantization.QuantFormat.QDQ,
    )  # fmt: skip
    return (tmp / "int8.onnx").read_bytes()


def onnx_runner(data: bytes) -> Callable:
    ort = _need("onnxruntime", "onnx")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


RUNNERS = {"jax": jax_runner, "tflite": tflite_runner, "onnx": onnx_runner}
