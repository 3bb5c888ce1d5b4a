"""Data parallelism with jax.sharding: a 1-D 'data' mesh, replicated parameters, sharded batches.

The same code runs on one device (a mesh of one). Across hosts (distributed.py) `jax.devices()`
lists every process's devices and the mesh spans them all; each process loads the same data.
"""

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_jax import backend
from cnn_jax.errors import UserError


def create_mesh(devices: int | None = None, platform: str | None = None) -> Mesh:
    """A mesh over the first `devices` devices of `platform` (all, and the default backend's,
    when None)."""
    available = backend.devices(platform)
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise UserError(
            f"--devices {devices}: this machine has {len(available)} "
            f"{available[0].platform.upper()} device(s)"
        )
    chosen = available[:n]
    processes = {d.process_index for d in available}
    if {d.process_index for d in chosen} != processes:
        raise UserError(
            f"--devices {devices} leaves out some of the run's {len(processes)} processes: give "
            f"all {len(available)} devices (or leave --devices out)"
        )
    return Mesh(np.asarray(chosen), ("data",))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    n = mesh.size
    if batch_size % n:
        raise UserError(
            f"batch size {batch_size} does not divide over {n} devices: use a multiple of {n} "
            "or fewer --devices"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def sharded(mesh: Mesh) -> NamedSharding:
    """Split along the first (batch) axis."""
    return NamedSharding(mesh, PartitionSpec("data"))
