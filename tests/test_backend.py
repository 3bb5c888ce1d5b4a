"""Platform choices: the steps-per-call rule, deterministic GPU ops, matmul precision."""

import os
import platform
import subprocess
import sys

import jax
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


def test_deterministic_gpu_ops_are_a_compile_option_xla_knows():
    assert backend.compiler_options("gpu", True) == {backend.DETERMINISTIC_OPTION: True}
    assert backend.compiler_options("gpu", False) == {backend.DETERMINISTIC_OPTION: False}
    assert backend.compiler_options("cpu", True) == {}
    # This XLA knows the option (a GPU program would compile with it), and refuses one it
    # does not know: a renamed option fails loudly instead of being dropped.
    add_one = lambda x: x + 1  # noqa: E731
    for on in (True, False):
        jax.jit(add_one, compiler_options={backend.DETERMINISTIC_OPTION: on}).lower(1.0).compile()
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(add_one, compiler_options={"xla_gpu_no_such_option": True}).lower(1.0).compile()
    assert backend.repeats("cpu", False) and backend.repeats("gpu", True)
    assert not backend.repeats("gpu", False) and not backend.repeats("tpu", True)


def test_unknown_platform_is_an_error():
    with pytest.raises(ValueError, match="unknown platform"):
        backend.resolve_platform("npu")


@pytest.mark.parametrize(
    "model, batch, cores, expected",
    [(3, 64, 2, 2), (2, 64, 2, 1), (3, 16, 2, 1), (3, 48, 4, 3), (3, 64, 1, 1)],
)
def test_cpu_devices_for_training(model, batch, cores, expected):
    assert backend.cpu_devices_for(model, batch, cores) == expected
    assert backend.cpu_devices_for(model, batch, cores, onednn=True) == 1  # it spreads itself


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (6, 4), (64, 16)])
def test_inference_splits_the_cpu_by_its_cores_before_jax_starts(monkeypatch, cores, expected):
    """The count a classifying command asks for: the cores, at most one per 16 images of the
    batch of 256 and a divisor of it; JAX started long ago in this process (conftest.py, 8
    devices), so a count other than its own is refused and it keeps its devices."""
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.setattr(backend, "_cores", lambda: cores)
    asked = []
    monkeypatch.setattr(backend, "_give_cpu_devices", lambda n: asked.append(n) or 0)
    backend.split_cpu_for_inference("cpu", 256)
    backend.split_cpu_for_inference("gpu", 256)
    assert asked == [expected]  # and none for the GPU
    monkeypatch.undo()
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    assert backend._give_cpu_devices(2) == 0 and len(jax.devices("cpu")) == 8


# A compiled program whose scratch buffers (three 4 MB activations and their gradients) are
# allocated and freed at every call, as a training step's are; prints the minor page faults
# of 20 calls after 3 warm-up calls.
_SCRATCH_CALLS = """
import resource, sys
from cnn_jax import backend
if sys.argv[1] == "keep":
    assert backend.keep_freed_memory()
import jax, jax.numpy as jnp
from jax import lax

def loss(k, x):
    for _ in range(3):
        x = jax.nn.relu(lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return jnp.sum(x)

step = jax.jit(jax.grad(loss))
k, x = jnp.full((3, 3, 32, 32), 0.01), jnp.ones((32, 32, 32, 32))
for _ in range(3):
    jax.block_until_ready(step(k, x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    jax.block_until_ready(step(k, x))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize(
    "environ, alone",
    [
        ({}, False),
        ({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, False),
        ({"CNN_JAX_KEEP_FREED_MEMORY": "1"}, False),
        ({"CNN_JAX_KEEP_FREED_MEMORY": "0"}, True),
        ({"CNN_JAX_KEEP_FREED_MEMORY": " Off"}, True),
        ({"MALLOC_TOP_PAD_": "131072"}, True),
        ({"MALLOC_ARENA_MAX": "8"}, True),
        ({"GLIBC_TUNABLES": "glibc.rtld.nns=4:glibc.malloc.arena_max=2"}, True),
    ],
)
def test_malloc_is_left_as_the_environment_says(environ, alone):
    assert backend.malloc_left_alone(environ) is alone
    if alone:  # returns before it sets anything, so this process's malloc stays as it was
        assert backend.keep_freed_memory(environ) is False


def test_a_malloc_switch_neither_on_nor_off_is_one_line_and_exit_2():
    env = {**os.environ, "CNN_JAX_KEEP_FREED_MEMORY": "disable"}
    done = subprocess.run([sys.executable, "-m", "cnn_jax", "info", "nowhere"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "CNN_JAX_KEEP_FREED_MEMORY='disable': set it to 0 (off) or 1 (on)" in done.stderr


_OTHER_MALLOC = "LD_PRELOAD" in os.environ or backend.malloc_left_alone(os.environ)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or _OTHER_MALLOC,
    reason="keep_freed_memory sets glibc's own malloc, here left as it starts",
)
def test_kept_freed_memory_spares_each_call_faulting_its_scratch_memory_in_again():
    """With glibc's defaults a call's freed scratch memory went back to the system and the next
    call faulted it in again (BENCHMARKS.md). Page faults, not times: 164,000-170,000 with the
    defaults and 6,000-50,000 kept, over 8 runs on a 2-core EPYC."""

    def faults(mode):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
        command = [sys.executable, "-c", _SCRATCH_CALLS, mode]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert kept < default / 2, (kept, default)
