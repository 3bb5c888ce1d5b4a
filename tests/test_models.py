"""The two networks: parameter counts, shapes, initialisers, pooling and dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import inference
from cnn_jax.cli import main
from cnn_jax.models import count_params, create_model


def test_parameter_counts_match_the_tutorial():
    # Keras' model.summary() for the tutorial's networks at 30x30x3 and 43 classes.
    assert count_params(create_model(1)) == 809_387
    assert count_params(create_model(2)) == 319_979


@pytest.mark.parametrize(
    "model, size, flat",
    [(1, 30, 14 * 14 * 32), (2, 30, 6 * 6 * 64), (1, 48, 23 * 23 * 32), (2, 48, 10 * 10 * 64)],
)
def test_shapes_follow_the_input_size(model, size, flat):
    m = create_model(model, image_size=size, num_classes=7)
    assert m.dense1.kernel[...].shape == (flat, 128)
    out = m(jnp.zeros((5, size, size, 3)))
    assert out.shape == (5, 7)


def test_initialisers_are_keras_defaults():
    m = create_model(2, seed=3)
    for layer in (m.conv1, m.conv2, m.dense1, m.logits):
        kernel = np.asarray(layer.kernel[...])
        fan_in = int(np.prod(kernel.shape[:-1]))
        fan_out = kernel.shape[-1] * int(np.prod(kernel.shape[:-2]))
        limit = np.sqrt(6 / (fan_in + fan_out))  # glorot_uniform
        assert np.abs(kernel).max() <= limit
        assert np.abs(kernel).max() > 0.9 * limit  # uniform fills the range; a normal would not
        np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0.0)


def test_seed_decides_the_weights():
    a, b, c = create_model(1, seed=0), create_model(1, seed=0), create_model(1, seed=1)
    np.testing.assert_array_equal(a.conv1.kernel[...], b.conv1.kernel[...])
    assert not np.array_equal(a.conv1.kernel[...], c.conv1.kernel[...])


def test_dropout_only_with_a_key():
    m = create_model(2)
    x = jax.random.uniform(jax.random.key(0), (8, 30, 30, 3))
    np.testing.assert_array_equal(m(x), m(x))
    dropped = m(x, dropout_key=jax.random.key(1))
    assert not np.allclose(dropped, m(x))


def test_bad_model_choices_are_errors():
    with pytest.raises(ValueError, match="unknown model"):
        create_model(4)
    with pytest.raises(ValueError, match="too small"):
        create_model(2, image_size=8)


def test_a_wider_model_3_has_its_filters_times_the_width():
    plain, wide = create_model(3, 32), create_model(3, 32, width=1.5)
    widths = [int(c.kernel[...].shape[-1]) for c in wide.convs]
    assert widths == [48, 96, 192] == [round(1.5 * w) for w in plain.WIDTHS]
    assert wide.dense1.kernel[...].shape == (4 * 4 * 192, 256)
    assert wide.convs2[2].kernel[...].shape == (3, 3, 192, 192)
    assert wide(jnp.zeros((2, 32, 32, 3))).shape == (2, 43)
    with pytest.raises(ValueError, match="model 3 only"):
        create_model(2, width=1.5)


def test_a_wider_run_restores_at_its_width_and_the_keras_reference_refuses_it(tmp_path, capsys):
    workdir = tmp_path / "r"
    args = ["train", "--model", "3", "--width", "0.5", "--image-size", "16", "--epochs", "1"]
    args += ["--synthetic-per-class", "5", "--workdir", str(workdir), "--platform", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    restored = inference.load_checkpoint(workdir)
    assert restored.config.width == 0.5
    assert np.asarray(restored.params["convs"][0]["kernel"]).shape == (3, 3, 3, 16)
    convert = pytest.importorskip("keras_ref.convert")  # TensorFlow: the keras extra
    with pytest.raises(convert.ConversionError, match="--width 0.5"):
        convert.to_keras(workdir)
