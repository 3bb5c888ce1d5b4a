"""`cnn-jax export`: every format holds the network (checked in its own runtime), a failed check
writes nothing, and the exported files run with their runtime alone."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cnn_jax.cli import main
from cnn_jax.config import Config
from cnn_jax.export import Request, export, sidecar_path
from cnn_jax.train import fit

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _run(tmp_path_factory, tiny, name, **settings):
    workdir = tmp_path_factory.mktemp(name) / "run"
    cfg = Config(platform="cpu", epochs=1, synthetic_per_class=10, devices=1, **settings)
    fit(cfg, tiny, workdir)
    return workdir


pytestmark = pytest.mark.xdist_group("export")  # module fixtures set up once (pyproject.toml)


@pytest.fixture(scope="module")
def model2(tmp_path_factory, tiny):
    return _run(tmp_path_factory, tiny, "model2")


@pytest.fixture(scope="module")
def tflite(model2, tmp_path_factory):
    pytest.importorskip("ai_edge_litert")
    out = tmp_path_factory.mktemp("tflite") / "model.tflite"
    return out, export(model2, out)


def test_the_jax_export_runs_without_cnn_jax_or_flax(model2, tmp_path):
    out = tmp_path / "model.jax"
    sidecar = export(model2, out)
    assert sidecar["self_check"]["max_abs_difference"] <= 1e-5
    assert sidecar["input"]["shape"] == ["batch", 30, 30, 3]
    images = np.random.default_rng(0).integers(0, 256, (5, 30, 30, 3), np.uint8)
    np.save(tmp_path / "images.npy", images)
    alone = (
        "import sys, numpy as np, jax\n"
        f"e = jax.export.deserialize(bytearray(open({str(out)!r}, 'rb').read()))\n"
        f"p = np.asarray(e.call(np.load({str(tmp_path / 'images.npy')!r})))\n"
        "assert not {'cnn_jax', 'flax'} & set(sys.modules), 'imported'\n"
        f"np.save({str(tmp_path / 'probs.npy')!r}, p)\n"
    )
    subprocess.run([sys.executable, "-c", alone], check=True, cwd=tmp_path, env={"PATH": ""})
    from cnn_jax.export.formats import jax_runner

    got = np.load(tmp_path / "probs.npy")
    assert got.shape == (5, 43)
    # The program the self-check ran (against the predictor, within 1e-5), loaded alone.
    np.testing.assert_array_equal(got, jax_runner(out.read_bytes())(images))


def test_the_sidecar_says_how_to_feed_the_network(tflite, model2):
    out, sidecar = tflite
    assert json.loads(sidecar_path(out).read_text()) == sidecar
    assert out.stat().st_size == sidecar["bytes"]
    assert sidecar["input"] == {"shape": [1, 30, 30, 3], "dtype": "uint8", "layout": "NHWC",
                                "channels": "RGB", "values": "0..255"}  # fmt: skip
    assert sidecar["classes"][14] == {"id": 14, "name": "Stop"} and len(sidecar["classes"]) == 43
    assert sidecar["resize"]["decoder"] == "opencv" and sidecar["pixels"]["scaling"] == "unit"
    info = subprocess.run([sys.executable, "-m", "cnn_jax", "info", str(model2), "--json"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert sidecar["checkpoint"]["params_sha256"] == json.loads(info.stdout)["params_sha256"]
    check = sidecar["self_check"]
    assert check["n"] == 172 and check["top1_agreement"] == 1.0
    assert check["max_abs_difference"] <= 1e-5 and check["accuracy"] == check["checkpoint_accuracy"]


def test_an_equalizing_ensemble_exports_to_tflite(tmp_path_factory, tiny):
    """The portable graph (members one after the other, equalisation without a scatter) in
    XNNPACK, which refused a vmapped ensemble; at a batch of 2, on a sample of 20 images."""
    pytest.importorskip("ai_edge_litert")
    run = _run(tmp_path_factory, tiny, "ensemble", ensemble=2, pixels="equalize")
    out = tmp_path_factory.mktemp("out") / "model.tflite"
    sidecar = export(run, out, Request(batch=2, check_images=20))
    check = sidecar["self_check"]
    assert check["n"] == 20 and sidecar["input"]["shape"] == [2, 30, 30, 3]
    assert check["max_abs_difference"] <= 1e-5 and check["top1_agreement"] == 1.0


def test_a_spatial_transformer_exports_to_tflite_and_onnx(tmp_path_factory, tiny):
    """Its warp is a gather of bilinear neighbours, which TFLite and ONNX must both run."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("onnxruntime")
    run = _run(tmp_path_factory, tiny, "stn", model=3, stn=True)
    for name in ("model.tflite", "model.onnx"):
        out = tmp_path_factory.mktemp("out") / name
        check = export(run, out, Request(check_images=20))["self_check"]
        assert check["max_abs_difference"] <= 1e-5 and check["top1_agreement"] == 1.0, name


def test_local_contrast_exports_to_tflite_and_onnx(tmp_path_factory, tiny):
    """`--pixels local` is two products with band matrices inside the graph."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("onnxruntime")
    run = _run(tmp_path_factory, tiny, "local", pixels="local")
    for name in ("model.tflite", "model.onnx"):
        out = tmp_path_factory.mktemp("out") / name
        check = export(run, out, Request(check_images=20))["self_check"]
        assert check["max_abs_difference"] <= 1e-5 and check["top1_agreement"] == 1.0, name


def test_int8_exports_are_calibrated_and_a_quarter_the_size(model2, tmp_path, monkeypatch):
    """The mechanics of quantizing (calibration, conversion, the runtime): a network trained
    one epoch on 430 images has near-even probabilities, whose top-1 int8 rounding changes,
    so the 99% bar is lowered here and the agreement only recorded."""
    pytest.importorskip("onnxruntime")
    import cnn_jax.export

    monkeypatch.setattr(cnn_jax.export, "AGREEMENT", 0.0)
    float_size = export(model2, tmp_path / "float.tflite", Request(check_images=50))["bytes"]
    for name in ("int8.tflite", "int8.onnx"):
        sidecar = export(model2, tmp_path / name, Request(quantize="int8", check_images=50))
        assert sidecar["quantize"] == "int8" and sidecar["bytes"] < 0.3 * float_size, name
        assert 0 < sidecar["self_check"]["top1_agreement"] <= 1, name


def test_the_portable_equalisation_is_the_trained_one_exactly():
    import jax.numpy as jnp

    from cnn_jax.data.pixels import _equalize
    from cnn_jax.export.graph import equalize

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 12, 10, 3)).astype(np.float32)
    x[1] = rng.integers(0, 40, (12, 10, 3))  # a dark one
    x[2] = 128.0  # a flat one
    np.testing.assert_array_equal(np.asarray(equalize(jnp.asarray(x))), _equalize(x))


def test_a_failed_self_check_writes_nothing(model2, tmp_path, monkeypatch, capsys):
    from cnn_jax.export import formats

    real = formats.RUNNERS["jax"]
    monkeypatch.setitem(formats.RUNNERS, "jax", lambda d: lambda x: real(d)(x) + 1e-4)
    out = tmp_path / "model.jax"
    assert main(["export", str(model2), str(out)]) == 2
    err = capsys.readouterr().err
    assert "disagrees with the checkpoint" in err and "nothing written" in err, err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, words",
    [
        (["model.pt"], "cannot tell the format"),
        (["model.tflite", "--format", "onnx"], "ends in .onnx"),
        (["model.jax", "--quantize", "int8"], "use --format tflite, onnx"),
        (["model.onnx", "--quantize", "float16"], "use --format tflite"),
        (["model.jax", "--batch", "4"], "takes any batch size"),
        (["model.tflite", "--batch", "0"], "at least 1"),
        (["existing.jax"], "exists"),
        (["missing/model.jax"], "is not a folder"),
    ],
)
def test_requests_that_cannot_be_met_are_one_line(model2, tmp_path, capsys, argv, words):
    (tmp_path / "existing.jax").write_text("someone's")
    assert main(["export", str(model2), str(tmp_path / argv[0]), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert (tmp_path / "existing.jax").read_text() == "someone's"


def test_the_runtime_only_example_matches_predict(tflite, model2, real_data, tmp_path):
    """scripts/classify_exported.py with TFLite and ONNX, no cnn_jax, JAX or TensorFlow: the
    same class as `cnn-jax predict`, the probability within what a resize rounding moves."""
    pytest.importorskip("onnxruntime")
    photo = str(real_data / "14" / "00000_00000.ppm")
    onnx = tmp_path / "model.onnx"
    export(model2, onnx)
    check = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import classify_exported as c\n"
        "print(json.dumps([c.classify(m, [sys.argv[4]])[0][1] for m in sys.argv[2:4]]))\n"
        "assert not {'cnn_jax', 'jax', 'tensorflow'} & set(sys.modules), 'imported'\n"
    )
    argv = [sys.executable, "-c", check, str(ROOT / "scripts"), str(tflite[0]), str(onnx), photo]
    ran = subprocess.run(argv, capture_output=True, text=True, check=True)
    predicted = subprocess.run([sys.executable, "-m", "cnn_jax", "predict", str(model2), photo,
                                "--json"], capture_output=True, text=True, check=True)  # fmt: skip
    ours = json.loads(predicted.stdout)[0]["top"][0]
    for best in json.loads(ran.stdout):
        assert best[0][0] == ours["class"]
        assert abs(best[0][2] - ours["probability"]) < 1e-3
