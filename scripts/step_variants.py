"""What the conv-block rewrites bought: the training step with each of them switched off.

    python scripts/step_variants.py            # Models 1 and 2, batch 32, random images

The step is the one `cnn-jax train` compiles (matmul convolutions, Keras Adam, dropout). The
variants undo, one at a time, the two rewrites in cnn_jax/models.py and cnn_jax/ops.py: pooling
before the bias and ReLU, and the pool's written-out gradient (JAX's own gradient of the max
instead). Each variant runs in turn, `--rounds` rounds of 100 steps; medians per round.
"""

import argparse
import dataclasses
import statistics
from unittest import mock

import numpy as np
from flax import nnx

from cnn_jax import ops
from cnn_jax.config import Config
from cnn_jax.loop import train_epoch
from cnn_jax.steps import create_trainer

VARIANTS = {
    "as shipped": {},
    "Keras order (pool after bias and ReLU)": {"pool_first": False},
    "JAX's own pool gradient": {"pool": ops._pool},
    "both undone": {"pool_first": False, "pool": ops._pool},
}


def step_ms(model: int, variant: dict, rounds: int, n: int = 3200) -> list[float]:
    pool = variant.get("pool", ops.max_pool_2x2)
    with mock.patch.object(ops, "max_pool_2x2", pool):  # models look it up at each call
        trainer, state = create_trainer(Config(model=model, devices=1), 43)
        if "pool_first" in variant:
            net = nnx.merge(trainer.graphdef, state.params)
            net.pool_first = variant["pool_first"]
            trainer = dataclasses.replace(trainer, graphdef=nnx.graphdef(net))
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, 30, 30, 3), dtype=np.uint8)
        labels = rng.integers(0, 43, n).astype(np.int32)
        images, labels = trainer.place((images, labels))
        medians = []
        for r in range(rounds + 1):  # round 0 compiles
            state, ms, _, _ = train_epoch(trainer, state, images, labels, np.arange(n), 0)
            if r:
                medians.append(statistics.median(ms))
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, nargs="+", default=[2, 1])
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    for model in args.models:
        for name, variant in VARIANTS.items():
            medians = step_ms(model, variant, args.rounds)
            print(
                f"model {model}  {name:40s} ms/step, median of each round: "
                + " ".join(f"{m:.2f}" for m in medians),
                flush=True,
            )


if __name__ == "__main__":
    main()
