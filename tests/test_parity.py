"""The port against the Keras reference: layers, forward, training steps, Adam, conversion."""

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the parity tests need the keras extra")
pytest.importorskip("keras_ref")  # pins the TensorFlow backend before keras loads
keras = pytest.importorskip("keras")

from flax import nnx  # noqa: E402

from cnn_jax.cli import main  # noqa: E402
from cnn_jax.optim import keras_adam  # noqa: E402
from keras_ref import convert, parity  # noqa: E402
from keras_ref.models import create_model  # noqa: E402


@pytest.mark.parametrize("model", [1, 2])
@pytest.mark.parametrize("size", [30, 48])
def test_every_layer_has_keras_shape_and_parameter_count(model, size):
    net, trainer, state = parity.twins(model, image_size=size)
    flax_model = nnx.merge(trainer.graphdef, state.params)
    x = np.zeros((2, size, size, 3), np.float32)
    ours = flax_model.outputs(x)
    assert [name for name, _ in ours] == [layer.name for layer in net.layers]
    for (name, out), layer in zip(ours, net.layers):
        assert out.shape[1:] == tuple(layer.output.shape[1:]), name
        sub = getattr(flax_model, name, None)
        n = 0 if sub is None else sum(p.size for p in jax_leaves(nnx.state(sub, nnx.Param)))
        assert n == layer.count_params(), name


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.parametrize("model", [1, 2, 3])
def test_forward_matches_keras(model):
    d = parity.forward_difference(model)
    assert d["max_abs"] < 1e-5, d
    assert d["same_predictions"]


@pytest.mark.parametrize("flat", [False, True], ids=["noise", "flat-halves"])
@pytest.mark.parametrize("model", [1, 2])
def test_five_adam_steps_match_keras(model, flat):
    d = parity.training_difference(model, steps=5, flat=flat)
    assert d["max_weight_change"] > 1e-3  # the weights did move
    assert d["max_abs"] < 1e-4, d


# A gradient sums up to 32 x 30 x 30 = 28,800 float32 products; summed in another order (the
# two frameworks' kernels) such a sum moves by about sqrt(n) * 2**-24 of its terms' size when
# the rounding errors are independent, 1e-5: 3e-5 of each array's largest value allows that
# (measured: at most 4.1e-6), where a wrong formula moves a gradient by percents.
GRADIENT_RTOL = 3e-5
# Model 3's weights whose gradients Keras computes as cnn_jax does: the head and the last
# convolution with its batch norm. Below norm3b, TensorFlow's gradients part from ours by up to
# 3.6% of their size; ours equal float64 finite differences there (norm3a's shift, channel
# 116: -0.0122239 from both, TensorFlow -0.0106), so the difference is TensorFlow's.
MODEL_3_SHARED = ("logits/", "dense1/", "norms2/2/", "convs2/2/")


@pytest.mark.parametrize("model", [1, 2, 3])
def test_one_batchs_loss_and_gradients_match_keras(model):
    ours, theirs, differences = parity.gradient_differences(model, 30 if model < 3 else 32)
    assert ours == pytest.approx(theirs, rel=GRADIENT_RTOL)  # sums as long: the same argument
    if model == 3:
        differences = {k: v for k, v in differences.items() if k.startswith(MODEL_3_SHARED)}
        assert len(differences) == 7
    assert max(differences.values()) < GRADIENT_RTOL, differences


@pytest.mark.xfail(
    strict=True,
    reason="TensorFlow's gradients of Model 3 below its last batch norm differ from ours (and "
    "from float64 finite differences) by up to 3.6% (MODEL_3_SHARED)",
)
def test_five_gradient_steps_of_model_3_match_keras():
    """Plain gradient descent on both sides (Adam would turn float32 noise in the directions
    batch norm leaves without gradient into whole steps of the learning rate), batch
    statistics compared too. Fails while TensorFlow's gradient below norm3b differs."""
    d = parity.training_difference(3, steps=5, sgd=0.05)
    assert d["max_weight_change"] > 1e-2  # the weights did move
    assert d["max_abs"] < 1e-4, d


def test_pool_gradient_ties_go_where_tensorflow_sends_them():
    import jax
    import jax.numpy as jnp
    import tensorflow as tf

    from cnn_jax.ops import max_pool_2x2

    x = np.random.default_rng(0).integers(0, 3, (2, 9, 8, 3)).astype(np.float32)  # many ties
    w = np.random.default_rng(1).normal(size=(2, 4, 4, 3)).astype(np.float32)
    ours = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * w))(jnp.asarray(x))
    xt = tf.Variable(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(keras.layers.MaxPooling2D((2, 2))(xt) * w)
    np.testing.assert_array_equal(ours, tape.gradient(loss, xt).numpy())


@pytest.mark.parametrize("scale", [1e-3, 1e-7])  # tiny gradients: where optax's Adam differs
def test_keras_adam_matches_keras_optimizer(scale):
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(20,)).astype(np.float32)
    grads = [(rng.normal(size=(20,)) * scale).astype(np.float32) for _ in range(5)]
    var = keras.Variable(w0)
    opt = keras.optimizers.Adam(1e-3)
    tx = keras_adam(1e-3)
    w, s = jnp.asarray(w0), tx.init(jnp.asarray(w0))
    for g in grads:
        opt.apply_gradients([(keras.ops.convert_to_tensor(g), var)])
        u, s = tx.update(jnp.asarray(g), s, w)
        w = optax.apply_updates(w, u)
    # Elementwise arithmetic only: where the two updates differ in their last bits (1e-3 of
    # eps), w + u may round to the neighbouring float, at most one spacing of |w| per step.
    spacing = np.spacing(np.abs(w0).max() + 5e-3, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(w), var.numpy(), rtol=0, atol=len(grads) * spacing)


def _tutorial_model():
    """The tutorial's get_model() for Model 2, in plain Keras with default layer names."""
    model = keras.models.Sequential(
        [
            keras.Input(shape=(30, 30, 3)),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D(pool_size=(2, 2)),
            keras.layers.Conv2D(64, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D(pool_size=(2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(43, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def _write_folder(root, ds):
    from PIL import Image

    for i, (img, y) in enumerate(zip(ds.images, ds.labels)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / str(y) / f"{i:05d}_00000.png")


def test_a_tutorial_keras_file_imports_evaluates_and_exports(tmp_path, capsys):
    from cnn_jax import data
    from cnn_jax.data.synthetic import make_synthetic

    _write_folder(tmp_path / "signs", make_synthetic(12, seed=3))
    ds = data.load_folder(tmp_path / "signs", use_cache=False)
    x, y = ds.images.astype(np.float32), keras.utils.to_categorical(ds.labels, 43)
    keras.utils.set_random_seed(1)
    net = _tutorial_model()
    net.fit(x, y, epochs=3, batch_size=32, verbose=0)  # raw pixels, as the tutorial
    _, keras_accuracy = net.evaluate(x, y, verbose=0)
    net.save(tmp_path / "cnn_model2.keras")

    assert main(["import-keras", str(tmp_path / "cnn_model2.keras"), str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ck"), str(tmp_path / "signs"), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["n"] == len(ds.labels)
    assert abs(ours["accuracy"] - keras_accuracy) <= 1 / len(ds.labels), (ours, keras_accuracy)

    assert main(["export-keras", str(tmp_path / "ck"), str(tmp_path / "back.keras")]) == 0
    back = keras.saving.load_model(tmp_path / "back.keras")
    for a, b in zip(net.get_weights(), back.get_weights()):
        np.testing.assert_array_equal(a, b)  # bit for bit


def test_model_3_round_trips_through_keras_with_its_batch_norm(tmp_path):
    from cnn_jax.inference import load_checkpoint
    from cnn_jax.predictor import evaluate
    from keras_ref import parity

    net, _, _ = parity.twins(3, image_size=32)
    net.save(tmp_path / "m3.keras")
    convert.import_keras(tmp_path / "m3.keras", tmp_path / "ck", pixels="unit")
    restored = load_checkpoint(tmp_path / "ck", platform="cpu")
    # Keras counts the moving mean and variance (2 x 2 x (32 + 64 + 128)) as parameters.
    assert restored.config.model == 3 and restored.param_count() == net.count_params() - 896
    images = parity.random_images(32, 32)
    theirs = net.predict(images.astype(np.float32) / 255, verbose=0).argmax(-1)
    ev = evaluate(restored.predictor, restored.params, images, theirs)
    assert ev["accuracy"] == 1.0  # every prediction as Keras makes it, batch norm included
    back = convert.to_keras(tmp_path / "ck")
    for a, b in zip(net.get_weights(), back.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # moving mean and variance too, bit for bit


def test_legacy_h5_imports(tmp_path):
    keras.utils.set_random_seed(0)
    net = create_model(1)
    net.save(tmp_path / "m1.h5")
    convert.import_keras(tmp_path / "m1.h5", tmp_path / "ck", pixels="unit")
    back = convert.to_keras(tmp_path / "ck")
    for a, b in zip(net.get_weights(), back.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_another_architecture_names_the_first_differing_layer(tmp_path, capsys):
    net = _tutorial_model()
    net.pop()
    net.pop()
    net.add(keras.layers.Dense(64, activation="relu", name="wide"))
    net.add(keras.layers.Dense(43, activation="softmax"))
    net.save(tmp_path / "other.keras")
    code = main(["import-keras", str(tmp_path / "other.keras"), str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert code == 2
    assert "not the tutorial's Model 2: layer 7 ('wide') is Dense(units=64" in err


def test_bad_keras_files_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "junk.keras").write_bytes(b"PK not a zip")
    (tmp_path / "notes.h5").write_text("just text")
    for name in ("junk.keras", "none.keras", "notes.h5"):
        assert main(["import-keras", str(tmp_path / name), str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "does not exist" in err[1]
    assert "is not a Keras model: a .keras file is a zip archive" in err[0]
    assert "is not a Keras model: a .h5 file is an HDF5 file" in err[2]


def test_compare_script_quick_mode_prints_the_table():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "compare.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--models", "2", "--pixels", "unit"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 2 | unit |")]
    assert [r.split("|")[3].strip() for r in rows] == ["jax", "keras"]
    assert all("319,979" in r and r.rstrip().endswith(("yes |", "no |")) for r in rows)


def test_bench_script_quick_mode_reports_both_frameworks():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--models", "2", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out[out.index("{") :])
    (row,) = result["train"]
    assert row["model"] == 2 and row["jax_ms"] > 0 and row["keras_ms"] > 0
    assert row["ratio"] == pytest.approx(row["jax_ms"] / row["keras_ms"])
    assert result["inference"][0]["jax"] > 0 and result["machine"]["cores"] >= 1
