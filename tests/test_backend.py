"""Platform choices: the steps-per-call rule, the deterministic-ops flag, matmul precision."""

import os
import subprocess
import sys

import pytest

from cnn_jax import backend


@pytest.mark.parametrize(
    "platform, steps, batch, expected",
    [
        ("cpu", 500, 32, 1),  # a call costs little next to a CPU step
        ("gpu", 500, 32, 500),  # the shared set's epoch at batch 32: one call
        ("gpu", 1000, 32, 500),  # capped at 16,384 images, split evenly: 2 calls of 500
        ("gpu", 1001, 32, 501),  # 2 calls of 501: the second runs one step past the end
        ("tpu", 63, 256, 63),
        ("gpu", 16, 1024, 16),
        ("gpu", 3, 100_000, 1),
    ],
)
def test_auto_steps_per_call(platform, steps, batch, expected):
    assert backend.steps_per_call("auto", platform, steps, batch) == expected


def test_explicit_steps_per_call_and_bad_values():
    assert backend.steps_per_call(7, "gpu", 500, 32) == 7
    for bad in (0, -1, "many", 2.5):
        with pytest.raises(ValueError, match="--steps-per-call"):
            backend.steps_per_call(bad, "cpu", 500, 32)


def test_precision_choices():
    assert backend.matmul_precision("default") is None
    assert backend.matmul_precision("highest") == "highest"
    with pytest.raises(ValueError, match="unknown precision"):
        backend.matmul_precision("tf32")


_FLAGS = """
import os, sys
from cnn_jax import backend
backend.use_deterministic_ops(sys.argv[1] == "on")
print(os.environ.get("XLA_FLAGS", ""))
import jax
jax.numpy.zeros(1).block_until_ready()  # the backend starts with the flag as set
try:
    backend.use_deterministic_ops(sys.argv[1] != "on")
except ValueError as e:
    print(e)
"""


@pytest.mark.parametrize("setting", ["on", "off"])
def test_deterministic_ops_are_set_before_jax_starts_and_not_after(setting):
    env = dict(
        os.environ, XLA_FLAGS="--xla_cpu_enable_fast_math=false " + backend.DETERMINISTIC_FLAG
    )
    out = subprocess.run(
        [sys.executable, "-c", _FLAGS, setting], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    flags = out[0].split()
    assert "--xla_cpu_enable_fast_math=false" in flags  # the user's other flags stay
    assert (backend.DETERMINISTIC_FLAG in flags) == (setting == "on")
    assert "must be chosen before JAX starts" in out[1]


def test_unknown_platform_is_an_error():
    with pytest.raises(ValueError, match="unknown platform"):
        backend.resolve_platform("npu")
