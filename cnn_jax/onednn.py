"""Convolutions through oneDNN on the CPU: the `onednn` extra.

XLA:CPU runs a convolution's gradients several times slower than oneDNN, the library under
TensorFlow's CPU kernels, and Model 3's training step is mostly convolutions: with oneDNN's, the
step is faster than Keras' on the same CPU (BENCHMARKS.md). `onednn_conv.cc` holds the three
operations as XLA FFI handlers; on first use it is compiled against the oneDNN wheels
(`pip install 'cnn-jax[onednn]'`, which also needs a C++ compiler) into the cache folder, once
per source, compile command, JAX version and oneDNN version, then loaded and registered with JAX.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` for what the models use:
float32 NHWC images, HWIO kernels, stride 1, "SAME" (odd kernels) or "VALID".
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.errors import UserError

SOURCE = Path(__file__).with_name("onednn_conv.cc")
LIBRARY_DIST, HEADERS_DIST = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
TARGETS = {"forward": "CnnConvForward", "input": "CnnConvInputGrad", "kernel": "CnnConvKernelGrad"}
INSTALL = "pip install 'cnn-jax[onednn]'"


# The files the build needs, by the end of their paths in the wheels.
LIBRARY, HEADER = "libdnnl.so", "oneapi/dnnl/dnnl.hpp"


def _located(dist: str, suffix: str) -> Path | None:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f for f in files if f"/{f.as_posix()}".endswith(f"/{suffix}")]
    return Path(found[0].locate()).resolve() if found else None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def missing() -> str | None:
    """Why oneDNN's convolutions cannot be built here, or None when they can."""
    if _located(LIBRARY_DIST, LIBRARY) is None or _located(HEADERS_DIST, HEADER) is None:
        return f"the oneDNN wheels are not installed ({INSTALL})"
    if _compiler() is None:
        return "no C++ compiler found (set CXX, or install g++)"
    return None


def available() -> bool:
    return missing() is None


def _build_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "cnn-jax" / "onednn"


def _build() -> Path:
    """Compiles onednn_conv.cc (once: the file's name holds what it was built from)."""
    lib = _located(LIBRARY_DIST, LIBRARY).parent
    include = _located(HEADERS_DIST, HEADER).parents[2]  # above oneapi/dnnl/
    command = [_compiler(), "-O2", "-std=c++17", "-shared", "-fPIC", str(SOURCE),
               f"-I{jax.ffi.include_dir()}", f"-I{include}", f"-L{lib}", "-ldnnl",
               f"-Wl,-rpath,{lib}"]  # fmt: skip
    inputs = [SOURCE.read_bytes(), " ".join(command).encode(), jax.__version__.encode(),
              importlib.metadata.version(LIBRARY_DIST).encode()]  # fmt: skip
    digest = hashlib.sha256(b"\0".join(inputs)).hexdigest()[:16]
    out = _build_dir() / f"cnn_onednn_{digest}.so"
    if not out.exists():
        try:
            _compile(command, out)
        except OSError as e:
            raise UserError(f"could not build oneDNN's convolutions in {out.parent}: {e}") from e
    return out


def _compile(command: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: processes building at once each get a whole file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(command + ["-o", partial], capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(partial, out)
            return
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    lines = done.stderr.strip().splitlines() or ["(no output)"]
    first = next((line for line in lines if "error" in line), lines[-1])
    raise UserError(
        f"could not compile oneDNN's convolutions with {command[0]}: {first} (--conv lax trains "
        "without them)"
    )


@functools.cache
def load() -> None:
    """Builds if needed, loads and registers the FFI targets with JAX (once a process).
    UserError when they cannot be built here."""
    reason = missing()
    if reason is not None:
        raise UserError(f"--conv onednn: {reason}")
    path = _build()
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        raise UserError(f"could not load oneDNN's convolutions ({path}): {e}") from e
    for symbol in TARGETS.values():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(symbol, capsule, platform="cpu")


def _call(target: str, shape, *operands, pad: int):
    # Nothing vmaps it today (an ensemble's members train in a loop, for_each_member); should
    # something, the call runs once per member.
    result = jax.ShapeDtypeStruct(shape, jnp.float32)
    call = jax.ffi.ffi_call(TARGETS[target], result, vmap_method="sequential")
    return call(*operands, pad=np.int64(pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, kernel, pad: int):
    kh, kw, _, out = kernel.shape
    b, h, w, _ = x.shape
    return _call(
        "forward", (b, h + 2 * pad - kh + 1, w + 2 * pad - kw + 1, out), x, kernel, pad=pad
    )


def _grads(pad, residuals, g):
    x, kernel = residuals
    return _call("input", x.shape, g, kernel, pad=pad), _call("kernel", kernel.shape, x, g, pad=pad)


_conv.defvjp(lambda x, k, pad: (_conv(x, k, pad), (x, k)), _grads)


def conv_general_dilated(inputs, kernel, window_strides=None, padding=None, **unused):
    """A drop-in for `lax.conv_general_dilated` on NHWC/HWIO float32, stride 1, "SAME" (odd,
    square kernels) or "VALID"."""
    kh, kw = kernel.shape[:2]
    if tuple(window_strides or (1, 1)) != (1, 1) or padding not in ("VALID", "SAME"):
        raise ValueError("oneDNN's convolution here handles stride 1, VALID or SAME only")
    if padding == "SAME" and (kh != kw or kh % 2 == 0):
        raise ValueError("oneDNN's SAME convolution here needs an odd, square kernel")
    if inputs.shape[-1] != kernel.shape[2]:  # oneDNN would read past the kernel
        raise ValueError(f"{inputs.shape[-1]} input channels for a kernel of {kernel.shape[2]}")
    if inputs.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise ValueError(f"oneDNN's convolution here is float32 only, not {inputs.dtype}")
    load()
    return _conv(inputs, kernel, kh // 2 if padding == "SAME" else 0)
