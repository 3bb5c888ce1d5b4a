"""The accelerator: precision, deterministic runs, steps per call, checkpoints back to the CPU.

Every test here is marked gpu and skips, with the reason, where JAX finds only CPU devices
(conftest.py). Training compiles its steps with XLA's deterministic GPU ops unless a config
says `deterministic=False` (backend.compiler_options), so the runs below repeat bit for bit.
"""

import dataclasses
import json
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import start_cli
from numerics import assert_same_function, assert_within, bound, relative

from cnn_jax import backend, checkpoint, ops, parallel, steps, train
from cnn_jax.config import Config
from cnn_jax.data.synthetic import make_synthetic

pytestmark = pytest.mark.gpu

# 516 training images: 17 steps per epoch at batch 32.
SMALL = dict(synthetic_per_class=20, devices=1)


@pytest.fixture(scope="module")
def small():
    return make_synthetic(SMALL["synthetic_per_class"])


def test_convolutions_at_highest_precision_agree_to_float32():
    """At JAX's default precision an H100 multiplies float32 as TF32 (8.8e-4 apart here)."""
    x = jax.random.normal(jax.random.key(0), (4, 30, 30, 32))
    k = jax.random.normal(jax.random.key(1), (3, 3, 32, 64)) * 0.1
    lax_conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    with jax.default_matmul_precision("highest"):
        fast = jax.jit(ops.conv3x3_matmul)(x, k)
        ref = jax.jit(lax_conv)(x, k)
    # Exact float32 products summed in other orders: within 9·C_in·eps·Σ|xk| (numerics.py);
    # TF32's 10-bit mantissa would be 2^13 times that.
    limit = bound(9 * 32, np.asarray(lax_conv(jnp.abs(x), jnp.abs(k))))
    assert_within(fast, ref, limit, "formulations")
    cpu = jax.devices("cpu")[0]
    on_cpu = jax.jit(lax_conv)(jax.device_put(x, cpu), jax.device_put(k, cpu))
    assert_within(ref, on_cpu, limit, "GPU and CPU")


def _one_sgd_step(platform, precision):
    """Probabilities before and the gradient of one step (SGD, learning rate 1), as NumPy.

    The same formulation on both sides (XLA's convolution, Keras' layer order) and noise
    images: on the synthetic signs' flat regions the matmul and XLA formulations break max-pool
    ties differently, and the gradients end 2.8e-4 apart on CPU alone (2.8e-4 too when an H200
    ran one and the CPU the other); on noise, 6e-7.
    """
    cfg = Config(platform=platform, precision=precision, devices=1, dropout=0.0, conv="lax")
    trainer, state = steps.create_trainer(cfg, 43)
    trainer = dataclasses.replace(trainer, tx=optax.sgd(1.0))
    state = trainer.place(trainer.init_state(state.params))
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (32, 30, 30, 3), np.uint8)
    labels = rng.integers(0, 43, 32).astype(np.int32)
    images, labels, order = trainer.place((noise, labels, np.arange(32)))
    probs = np.asarray(trainer.predictor.probabilities(state.params, images))
    before = [np.asarray(p) for p in jax.tree.leaves(state.params)]
    state = trainer.train_step(state, images, labels, order, 32, 0, 0)
    grads = [b - np.asarray(p) for b, p in zip(before, jax.tree.leaves(state.params))]
    return probs, grads


def test_a_highest_precision_step_on_the_accelerator_matches_the_cpu():
    """The whole forward and backward pass at `--precision highest` against float32 on CPU."""
    probs, grads = _one_sgd_step(None, "highest")
    cpu_probs, cpu_grads = _one_sgd_step("cpu", "highest")
    assert_same_function(np.log(probs), np.log(cpu_probs), "log-probabilities")  # numerics.py
    for g, ref in zip(grads, cpu_grads, strict=True):
        assert relative(g, ref) < 1e-4
    default_probs, _ = _one_sgd_step(None, "default")
    gap = np.abs(np.log(default_probs) - np.log(cpu_probs)).max()
    print(f"max |log p| difference at the default precision: {gap:.2e}")  # for -s runs


def test_auto_steps_per_call_equals_one_step_per_call(small):
    auto, m_auto = train.fit(Config(epochs=2, **SMALL), small, verbose=False)
    one, m_one = train.fit(Config(epochs=2, steps_per_call=1, **SMALL), small, verbose=False)
    assert m_auto["steps_per_call"] == 17 and m_one["steps_per_call"] == 1
    assert m_auto["deterministic"] and m_auto["platform"] != "cpu"
    assert checkpoint.params_digest(auto.params) == checkpoint.params_digest(one.params)
    assert m_auto["epochs"][-1]["train_loss"] == m_one["epochs"][-1]["train_loss"]


def _run(*args, cwd, env=None) -> str:
    proc = start_cli(*args, cwd=cwd, **(env or {}))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def _info(step_dir, cwd, env=None):
    return json.loads(_run("info", str(step_dir), "--json", cwd=cwd, env=env))


TRAIN = ["train", "--epochs", "6", "--synthetic-per-class", "20", "--quiet", "--devices", "1"]


def test_sigkill_and_resume_on_the_accelerator_is_bit_identical(tmp_path):
    """Killed mid-run with one step per call, resumed with `auto`: the uninterrupted run's bits."""
    _run(*TRAIN, "--workdir", str(tmp_path / "ref"), cwd=tmp_path)
    workdir = tmp_path / "run"
    args = ["--steps-per-call", "1", "--save-every", "3", "--workdir", str(workdir)]
    proc = start_cli(*TRAIN, *args, cwd=tmp_path)
    t0 = time.time()
    while not any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
        assert proc.poll() is None and time.time() - t0 < 300, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
    assert saved[-1] < 6 * 17, "the run ended before it was killed"
    _run(*TRAIN, "--workdir", str(workdir), cwd=tmp_path)
    last = f"checkpoints/{6 * 17}"
    assert (
        _info(workdir / last, tmp_path)["params_sha256"]
        == (_info(tmp_path / "ref" / last, tmp_path)["params_sha256"])
    )


def test_a_checkpoint_written_here_restores_on_a_cpu_only_process(small, tmp_path):
    state, metrics = train.fit(Config(epochs=1, **SMALL), small, tmp_path, verbose=False)
    cpu_only = {"JAX_PLATFORMS": "cpu"}
    info = _info(tmp_path, tmp_path, cpu_only)
    assert info["params_sha256"] == checkpoint.params_digest(state.params)
    result = json.loads(_run("evaluate", str(tmp_path), "--json", cwd=tmp_path, env=cpu_only))
    assert result["n"] == metrics["n_test"]
    # TF32 here, float32 there: a borderline image or two may flip.
    assert abs(result["accuracy"] - metrics["test_accuracy"]) <= 2 / metrics["n_test"]


def test_devices_are_counted_on_the_accelerator():
    accelerators = jax.devices()
    assert accelerators[0].platform != "cpu"
    mesh = parallel.create_mesh(None, backend.resolve_platform(None))
    assert mesh.size == len(accelerators) and mesh.devices.flat[0].platform != "cpu"
    name = accelerators[0].platform.upper()
    with pytest.raises(ValueError, match=f"this machine has {len(accelerators)} {name}"):
        parallel.create_mesh(len(accelerators) + 1)
    trainer, state = steps.create_trainer(Config(**SMALL), 43)
    assert state.params["conv1"]["kernel"][...].devices() == {accelerators[0]}
    assert trainer.platform != "cpu" and jnp.asarray(0).devices() == {accelerators[0]}
