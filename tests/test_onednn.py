"""oneDNN's convolutions (the onednn extra) against XLA's: values, gradients, an ensemble's
vmap, the choice `--conv auto` makes, reproducible training, and the errors where they cannot
be built."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from numerics import assert_within, bound

from cnn_jax import onednn, ops
from cnn_jax.cli import main
from cnn_jax.config import Config
from cnn_jax.errors import UserError
from cnn_jax.export import export
from cnn_jax.models import create_model
from cnn_jax.steps import create_trainer
from cnn_jax.train import fit, train_epoch

# .ci/run sets it: there a missing extra or compiler fails these tests instead of skipping them.
REQUIRED = os.environ.get("CNN_JAX_TESTS_NEED_ONEDNN") == "1"
needs_onednn = pytest.mark.skipif(
    not REQUIRED and not onednn.available(), reason=f"oneDNN's convolutions: {onednn.missing()}"
)


@pytest.fixture(autouse=True)
def on_cpu():
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _lax(x, k, padding):
    return lax.conv_general_dilated(
        x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@needs_onednn
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize(
    "shape", [(4, 32, 32, 3, 32, 3), (3, 13, 11, 32, 64, 3), (2, 9, 7, 8, 16, 5)]
)
def test_values_and_gradients_are_xlas(shape, padding):
    b, h, w, cin, cout, k = shape
    x = jax.random.normal(jax.random.key(0), (b, h, w, cin))
    kernel = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.1
    got = onednn.conv_general_dilated(x, kernel, (1, 1), padding)
    terms = k * k * cin
    assert_within(got, _lax(x, kernel, padding), bound(terms, _lax(abs(x), abs(kernel), padding)))
    w_out = jax.random.normal(jax.random.key(2), got.shape)

    def loss(conv, x, kernel):
        return jnp.sum(conv(x, kernel, (1, 1), padding) * w_out)

    def reference(x, kernel, strides, padding):
        return _lax(x, kernel, padding)

    mine = jax.grad(lambda x, k: loss(onednn.conv_general_dilated, x, k), (0, 1))(x, kernel)
    want = jax.grad(lambda x, k: loss(reference, x, k), (0, 1))(x, kernel)
    # Σ|terms| of each gradient entry: the same gradients of the loss on absolute values.
    scales = jax.grad(lambda x, k: jnp.sum(_lax(x, k, padding) * abs(w_out)), (0, 1))(
        abs(x), abs(kernel)
    )
    for name, g, r, scale, n in zip(
        "xk", mine, want, scales, (k * k * cout, b * h * w), strict=True
    ):
        assert_within(g, r, bound(n, scale), f"gradient of {name}")


@needs_onednn
def test_an_ensembles_members_each_get_their_own_kernel():
    x = jax.random.normal(jax.random.key(0), (3, 2, 8, 8, 4))
    kernels = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 6))
    got = jax.vmap(lambda x, k: onednn.conv_general_dilated(x, k, (1, 1), "SAME"))(x, kernels)
    want = jax.vmap(lambda x, k: _lax(x, k, "SAME"))(x, kernels)
    assert_within(
        got, want, bound(36, jax.vmap(lambda x, k: _lax(x, k, "SAME"))(abs(x), abs(kernels)))
    )


def test_auto_gives_model_3_onednn_on_cpu_in_float32_only():
    convs = lambda m: {c.conv_general_dilated for c in [*m.convs, *m.convs2]}  # noqa: E731
    xla = {lax.conv_general_dilated, ops.conv3x3_matmul}  # the matmul form for the first
    fast = {onednn.conv_general_dilated} if onednn.available() else xla
    assert convs(create_model(3, 32, platform="cpu")) == fast
    assert convs(create_model(3, 32, platform="cpu", dtype="bfloat16")) == xla
    assert convs(create_model(3, 32, platform="cpu", conv="lax")) == {lax.conv_general_dilated}
    # Models 1 and 2 keep the matmul form, which their small "valid" convolutions run fastest.
    assert create_model(2, platform="cpu").conv1.conv_general_dilated is ops.conv3x3_matmul


@needs_onednn
def test_training_with_it_is_reproducible_to_the_bit():
    cfg = Config(model=3, image_size=16, batch_size=8, platform="cpu", devices=1, conv="onednn")
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), np.uint8)
    labels = np.arange(32) % 4

    def trained():
        trainer, state = create_trainer(cfg, 4)
        placed = trainer.place((images, labels))
        return train_epoch(trainer, state, *placed, np.arange(32), 0)[0].params

    for a, b in zip(jax.tree.leaves(trained()), jax.tree.leaves(trained()), strict=True):
        np.testing.assert_array_equal(a, b)


@needs_onednn
def test_an_ensembles_members_train_in_a_loop_with_it():
    # Side by side, XLA runs one member's work on the cores each oneDNN convolution of another
    # spreads over (predictor.for_each_member); XLA's own convolutions stay unrolled.
    images = np.zeros((16, 16, 16, 3), np.uint8)

    def step_text(conv):
        cfg = Config(model=3, image_size=16, batch_size=8, platform="cpu", devices=1, conv=conv)
        trainer, state = create_trainer(dataclasses.replace(cfg, ensemble=2), 4)
        placed = trainer.place((images, np.zeros(16, np.int32), np.arange(16, dtype=np.int32)))
        seeds = np.arange(2, dtype=np.int32)
        return str(jax.make_jaxpr(trainer._train_step)(state, *placed, 16, 0, seeds))

    assert "scan[" in step_text("onednn") and "scan[" not in step_text("lax")


def test_a_missing_extra_is_named_before_the_data_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(onednn, "missing", lambda: "the oneDNN wheels are not installed (pip)")
    args = ["train", str(tmp_path / "missing"), "--model", "3", "--conv", "onednn"]
    assert main([*args, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "--conv onednn: the oneDNN wheels are not installed" in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


@needs_onednn
def test_bfloat16_is_refused_with_it(tmp_path, capsys):
    args = ["train", str(tmp_path / "missing"), "--model", "3", "--conv", "onednn"]
    assert main([*args, "--dtype", "bfloat16", "--workdir", str(tmp_path / "w")]) == 2
    assert "--conv onednn: it computes in float32 only" in capsys.readouterr().err


@needs_onednn
def test_a_failed_compile_says_so_in_one_line(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(onednn, "SOURCE", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="could not compile oneDNN's convolutions") as caught:
        onednn._build()
    assert "\n" not in str(caught.value)
    assert list((tmp_path / "cache" / "cnn-jax" / "onednn").iterdir()) == []  # nothing half-built


@needs_onednn
def test_auto_trains_with_it_on_one_device_only():
    def trainer(**settings):
        return create_trainer(Config(model=3, image_size=16, platform="cpu", **settings), 4)[0]

    assert trainer(devices=1).onednn and not trainer(devices=2).onednn
    assert not trainer(devices=1, conv="lax").onednn
    with pytest.raises(UserError, match="--conv onednn trains on one device, not 2"):
        trainer(devices=2, conv="onednn")


@needs_onednn
def test_a_run_trained_with_it_says_so_and_exports_without_it(tmp_path, tiny):
    cfg = Config(
        model=3, epochs=1, synthetic_per_class=10, platform="cpu", devices=1, conv="onednn"
    )
    fit(cfg, tiny, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["convolutions"] == "onednn"
    # The restored network classifies with XLA's convolutions: nothing in the export calls it.
    export(tmp_path / "run", tmp_path / "model.jax")
    assert b"CnnConv" not in (tmp_path / "model.jax").read_bytes()
