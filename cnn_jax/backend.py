"""Where training runs and how: the platform, deterministic GPU ops, matmul precision, and how
many steps one compiled call runs.
"""

import ctypes
import math
import os

# JAX is imported inside the functions, so that `cnn-jax --help` stays fast without it.
from cnn_jax.config import PLATFORMS, PRECISIONS
from cnn_jax.errors import UserError

# XLA:GPU runs some reductions with atomics and autotunes kernels by timing them, so two runs
# can round differently; this option excludes both (measured on an H100: +15-35% per step). It
# goes to the compiler with each program (jax.jit's compiler_options, which override XLA_FLAGS),
# so it needs no setting before JAX starts, and an XLA that no longer knows it refuses to compile
# ("No such compile option") rather than let a run be recorded as deterministic that is not.
DETERMINISTIC_OPTION = "xla_gpu_deterministic_ops"
# With --steps-per-call auto on an accelerator, one call runs up to this many images' worth of
# steps: a whole epoch of the shared set at batch 32 (about 0.1 s on an H100), so the progress
# bar, Ctrl-C and --save-every still answer several times a second.
IMAGES_PER_CALL = 16_384


# XLA:CPU allocates each call's scratch buffers anew (tens of MB for Model 3's step, one block of
# 74 MB a device at 48x48), and with glibc's defaults they went back to the system when freed,
# so every step faulted them in again (BENCHMARKS.md, "glibc's malloc"). Its worker threads
# each take a heap of their own, capped at 64 MB, and mmap whatever does not fit; so all threads
# share the main heap (M_ARENA_MAX), which never maps a block of its own (M_MMAP_MAX) and keeps
# 256 MiB of freed memory at its top (M_TOP_PAD). Values from glibc's malloc.h.
MALLOC_SETTINGS = {"M_TOP_PAD": (-2, 256 * 2**20), "M_MMAP_MAX": (-4, 0), "M_ARENA_MAX": (-8, 1)}


def keep_freed_memory(environ=os.environ) -> bool:
    """Sets glibc's malloc to keep the memory a compiled call frees for the next call
    (MALLOC_SETTINGS), process-wide; the `cnn-jax` command does it first. Call it before any
    thread starts (JAX's, a data loader's): a thread keeps the heap it first allocated from.
    True where glibc took the settings (a malloc preloaded in its place ignores them); without
    glibc nothing changes, nor where `environ` says to leave malloc alone (`malloc_left_alone`)."""
    if malloc_left_alone(environ):
        return False
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        return False
    if mallopt is None:
        return False
    return all([mallopt(option, value) == 1 for option, value in MALLOC_SETTINGS.values()])


# 0 (or false, no, off): keep_freed_memory leaves glibc's malloc at its defaults, for less
# resident memory; 1 (true, yes, on) or unset: it sets MALLOC_SETTINGS.
KEEP_FREED_MEMORY_VARIABLE = "CNN_JAX_KEEP_FREED_MEMORY"
_SWITCH = {"0": False, "false": False, "no": False, "off": False,
           "1": True, "true": True, "yes": True, "on": True, "": True}  # fmt: skip


def malloc_left_alone(environ) -> bool:
    """Whether the environment asks keep_freed_memory to change nothing: it switches it off, or
    it tunes glibc's malloc itself (MALLOC_* variables, glibc.malloc.* in GLIBC_TUNABLES), and a
    user's own settings win. A switch that is neither on nor off is a UserError."""
    value = environ.get(KEEP_FREED_MEMORY_VARIABLE, "")
    switch = _SWITCH.get(value.strip().lower())
    if switch is None:
        raise UserError(f"{KEEP_FREED_MEMORY_VARIABLE}={value!r}: set it to 0 (off) or 1 (on)")
    tuned = any(key.startswith("MALLOC_") for key in environ)
    return not switch or tuned or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def compiler_options(platform: str, deterministic: bool) -> dict:
    """jax.jit's compiler_options for a program on `platform`: XLA's deterministic GPU ops on
    or off (stated either way, so that neither XLA_FLAGS nor XLA's default decides)."""
    return {DETERMINISTIC_OPTION: deterministic} if platform == "gpu" else {}


def repeats(platform: str, deterministic: bool) -> bool:
    """Whether runs repeat bit for bit: XLA:CPU's programs always do; a GPU's with the option
    on. TPUs are not claimed: nothing here makes sure of it."""
    return platform == "cpu" or (platform == "gpu" and deterministic)


def resolve_platform(platform: str | None) -> str:
    """'cpu', 'gpu' or 'tpu': the given one, or the default backend's."""
    import jax

    if platform is None:
        return jax.default_backend()
    if platform not in PLATFORMS:
        raise UserError(f"unknown platform {platform!r}: choose one of {', '.join(PLATFORMS)}")
    return platform


def devices(platform: str | None = None) -> list:
    """The local devices of a platform (the default backend's when None)."""
    import jax

    platform = resolve_platform(platform)
    try:
        return jax.devices(platform)
    except RuntimeError:
        raise UserError(f"--platform {platform}: JAX finds no {platform.upper()} here") from None


def steps_per_call(setting: int | str, platform: str, steps_per_epoch: int, batch_size: int):
    """The training steps one compiled call runs for `--steps-per-call`.

    'auto' is 1 on CPU, where a call costs little next to a step (BENCHMARKS.md). On an
    accelerator one step per call is launch-bound (5x slower on an H100), so a call runs a whole
    epoch, at most IMAGES_PER_CALL images, split evenly so that no call runs wasted steps.
    """
    if setting != "auto":
        if not isinstance(setting, int) or setting < 1:
            raise UserError(f"--steps-per-call must be 'auto' or at least 1, got {setting!r}")
        return setting
    if platform == "cpu":
        return 1
    cap = max(1, IMAGES_PER_CALL // batch_size)
    calls = math.ceil(steps_per_epoch / cap)
    return math.ceil(steps_per_epoch / calls)


def matmul_precision(precision: str):
    """The value for `jax.default_matmul_precision`; None leaves JAX's default (TF32 on recent
    NVIDIA GPUs for float32, exact float32 on CPU)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return None if precision == "default" else precision


# On a 2-core CPU one XLA device kept about 1.2 cores busy with Model 3's step (its
# element-wise parts run on one thread); two devices, each with half the batch, took the
# recipe's step from 124 to 88 ms. Models 1 and 2 were not faster (their steps are too small).
SPLIT_CPU_MODELS = (3,)
SMALLEST_SHARE = 16  # images per device, at least


def cpu_devices_for(model: int, batch_size: int, cores: int, onednn: bool = False) -> int:
    """How many JAX CPU devices a training run of `model` gets by default: one per core for
    Model 3, at most one per 16 images of the batch and a count that divides it; else one.
    One with oneDNN's convolutions, which spread over every core themselves: on two devices
    the recipe's step at 30x30 took 3.2x as long (BENCHMARKS.md)."""
    if model not in SPLIT_CPU_MODELS or onednn:
        return 1
    return _per_core(batch_size, cores)


def _per_core(batch_size: int, cores: int) -> int:
    most = max(1, min(cores, batch_size // SMALLEST_SHARE))
    return max(n for n in range(1, most + 1) if batch_size % n == 0)


def split_cpu(model: int, batch_size: int, onednn: bool = False) -> int:
    """Before JAX starts: gives it `cpu_devices_for` CPU devices, which a run on the CPU with
    no --devices then trains over. JAX_NUM_CPU_DEVICES, when set, decides instead, and a JAX
    that has already started (a caller in the same process) keeps its devices. Returns the
    count set, or 0."""
    return _give_cpu_devices(cpu_devices_for(model, batch_size, _cores(), onednn))


# Classifying 256 images at a time on a 2-core CPU, two devices against one: Model 1 2.5x,
# Model 2 1.1x and Model 3 1.7x the images a second (BENCHMARKS.md).
def split_cpu_for_inference(platform: str | None, batch_size: int) -> int:
    """Before JAX starts, for the commands that classify with a checkpoint: for every model,
    as many CPU devices as there are cores (at most; a count that divides the batch), each
    classifying a slice of each batch. As `split_cpu` otherwise."""
    if platform not in (None, "cpu"):
        return 0
    return _give_cpu_devices(_per_core(batch_size, _cores()))


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _give_cpu_devices(n: int) -> int:
    if "JAX_NUM_CPU_DEVICES" in os.environ or n == 1:
        return 0
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # "should be updated before backends are initialized"
        return 0
    return n
