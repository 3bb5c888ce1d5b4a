"""The same training steps on 8 simulated CPU devices and on 1: how far apart the weights end.

    python scripts/devices_check.py            # 5 steps, dropout on and off

This prints the largest entry-wise gap, and how it grows over more steps (Adam turns rounding
differences in tiny gradients into full steps); tests/test_parallel.py bounds what holds on any
CPU instead: one step's gradient, and the norm of the gap relative to the update's.
"""

import argparse

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before JAX starts its CPU client

import numpy as np  # noqa: E402

from cnn_jax.config import Config  # noqa: E402
from cnn_jax.steps import create_trainer  # noqa: E402
from cnn_jax.synthetic import make_synthetic  # noqa: E402


def weights_after(devices: int, steps: int, dropout: float, n: int = 256):
    """Params after `steps` steps over the first n synthetic images (tests' `tiny` set)."""
    ds = make_synthetic(n_per_class=10, seed=0)
    cfg = Config(devices=devices, dropout=dropout, platform="cpu")
    trainer, state = create_trainer(cfg, 43)
    order = np.arange(n, dtype=np.int32)
    images, labels, order = trainer.place((ds.images[:n], ds.labels[:n], order))
    batches = n // trainer.batch_size
    for i in range(steps):
        state = trainer.train_step(state, images, labels, order, n, i % batches, 0)
    return state.params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[5, 50])
    args = p.parse_args()
    for dropout in (0.5, 0.0):
        for steps in args.steps:
            one, eight = weights_after(1, steps, dropout), weights_after(8, steps, dropout)
            diff = max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True)
            )
            print(f"dropout {dropout}  {steps:3d} steps  8 vs 1 device max |diff| {diff:.3g}")


if __name__ == "__main__":
    main()
