"""The spatial transformer in front of Model 3 (--stn): the identity at first, a warp that
follows its map, and weights that train, save and restore with the run."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnn_jax import inference, models, stn
from cnn_jax.cli import main


def _images(n=4, side=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, side, side, 3)), jnp.float32)


def test_a_new_transformer_is_the_identity_in_front_of_the_same_model_3():
    plain = models.create_model(3, 32, 43, seed=3)
    with_stn = models.create_model(3, 32, 43, seed=3, stn=True)
    x = _images()
    np.testing.assert_array_equal(np.asarray(with_stn.stn(x)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(with_stn(x)), np.asarray(plain(x)))
    localisation = models.count_params(with_stn.stn)
    assert models.count_params(with_stn) == models.count_params(plain) + localisation
    # conv 5x5 3->30, conv 5x5 30->60, dense (4x4x60)->30, dense 30->6, each with its bias
    assert localisation == (75 * 30 + 30) + (750 * 60 + 60) + (960 * 30 + 30) + (30 * 6 + 6)


def test_the_warp_follows_the_predicted_map():
    transformer = models.create_model(3, 32, 43, seed=0, stn=True).stn
    x = _images(side=32)
    # Output column c reads input column -c about the centre: a mirror image, exactly.
    transformer.theta.bias[...] = jnp.array([1.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    np.testing.assert_allclose(np.asarray(transformer(x)), np.asarray(x)[:, :, ::-1], atol=1e-5)
    # A shift by 2 in the -1..1 coordinates is a whole image: every pixel reads the far edge.
    transformer.theta.bias[...] = jnp.array([1.0, 0.0, 2.0, 0.0, 1.0, 0.0])
    out = np.asarray(transformer(x))
    np.testing.assert_allclose(out, np.broadcast_to(np.asarray(x)[:, -1:], out.shape), atol=1e-5)


def test_gradients_reach_the_localisation_network():
    model = models.create_model(3, 32, 43, seed=0, stn=True)
    x = _images()
    # Compiled: op by op, the gradient took 18 s of the suite's time, compiled 3.
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.mean(m(x) ** 2)))(model, x)
    # At first only the map's last layer gets a gradient: its zero kernel blocks the rest.
    assert float(jnp.abs(grads.stn.theta.kernel[...]).max()) > 0
    assert float(jnp.abs(grads.stn.theta.bias[...]).max()) > 0


def test_a_run_with_stn_trains_the_transformer_and_restores_it(tmp_path, capsys):
    workdir = tmp_path / "r"
    args = ["train", "--model", "3", "--stn", "--image-size", "32", "--epochs", "1"]
    args += ["--synthetic-per-class", "10", "--workdir", str(workdir), "--platform", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    restored = inference.load_checkpoint(workdir)
    assert restored.config.stn
    kernel = np.asarray(restored.params["stn"]["theta"]["kernel"])
    assert np.abs(kernel).max() > 0  # it moved from its zero start
    bias = np.asarray(restored.params["stn"]["theta"]["bias"])
    assert not np.array_equal(bias, np.asarray(stn.IDENTITY))
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["params"] == 823_051 + 76_356
    convert = pytest.importorskip("keras_ref.convert")  # TensorFlow: the keras extra
    with pytest.raises(convert.ConversionError, match="no spatial transformer"):
        convert.to_keras(workdir)
