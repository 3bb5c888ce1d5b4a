"""Where training runs and how: the platform, deterministic GPU ops, matmul precision, and how
many steps one compiled call runs.

XLA reads its flags once, when JAX starts its first backend, so determinism must be chosen
before any JAX work: the CLI does it first thing; from Python call `use_deterministic_ops()`
before anything else touches JAX (or export XLA_FLAGS=--xla_gpu_deterministic_ops=true).
"""

import math
import os

# JAX is imported inside the functions, so that `cnn-jax --help` stays fast without it.
from cnn_jax.config import PLATFORMS, PRECISIONS
from cnn_jax.errors import UserError

# XLA:GPU runs some reductions with atomics and autotunes kernels by timing them, so two runs
# can round differently; this flag excludes both (measured on an H100: +15-35% per step).
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
# With --steps-per-call auto on an accelerator, one call runs up to this many images' worth of
# steps: a whole epoch of the shared set at batch 32 (about 0.1 s on an H100), so the progress
# bar, Ctrl-C and --save-every still answer several times a second.
IMAGES_PER_CALL = 16_384


def _backends_started() -> bool:
    """Whether JAX has started a backend (and so read XLA_FLAGS). JAX 0.10 and 0.11 say so only
    through a private function: if a later JAX drops it, this raises rather than guess, since
    a wrong guess would record a run as deterministic that is not."""
    from jax._src import xla_bridge  # no public equivalent in JAX 0.10/0.11

    probe = getattr(xla_bridge, "backends_are_initialized", None)
    if probe is None:
        raise RuntimeError(
            "this JAX no longer has jax._src.xla_bridge.backends_are_initialized: cnn_jax.backend "
            "cannot tell whether XLA_FLAGS was read; update it for this JAX version"
        )
    return probe()


def deterministic_ops() -> bool:
    """Whether XLA_FLAGS asks for deterministic GPU ops (what the backend started with, if it
    started after the flag was set)."""
    return DETERMINISTIC_FLAG in os.environ.get("XLA_FLAGS", "").split()


def use_deterministic_ops(on: bool = True) -> None:
    """Turns XLA's deterministic GPU ops on or off; must run before JAX starts a backend.

    Raises ValueError when a backend already started with the other setting.
    """
    if on == deterministic_ops():
        return
    if _backends_started():
        raise UserError(
            f"deterministic ops must be chosen before JAX starts: call "
            f"cnn_jax.backend.use_deterministic_ops({on}) first, or set XLA_FLAGS"
        )
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f != DETERMINISTIC_FLAG]
    os.environ["XLA_FLAGS"] = " ".join(flags + [DETERMINISTIC_FLAG] * on)


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
