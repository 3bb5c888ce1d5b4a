"""Trains every (model, pixels, split, seed) asked for on one data folder and prints a table.

    python scripts/seeds.py ../shared/data/gtsrb --models 1 2 --pixels unit raw --seeds 0 1 2

Each run is `cnn_jax.train.fit`, the same function `cnn-jax train` calls, with the tutorial's
settings (10 epochs, batch 32, Adam 1e-3). One JSON line per run goes to --jsonl if given.
"""

import argparse
import json
import time

from cnn_jax import data
from cnn_jax.config import Config
from cnn_jax.train import fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--models", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pixels", nargs="+", default=["unit", "raw"])
    p.add_argument("--splits", nargs="+", default=["random"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--jsonl", help="append one JSON line per run to this file")
    args = p.parse_args()

    ds = data.load_folder(args.data)
    header = f"{'model':>5} {'pixels':>6} {'split':>6} {'seed':>4} {'test_loss':>9} "
    print(header + f"{'test_acc':>8} {'ms/step':>7} {'wall_s':>6}", flush=True)
    for model in args.models:
        for pixels in args.pixels:
            for split in args.splits:
                for seed in args.seeds:
                    cfg = Config(
                        model=model,
                        data=args.data,
                        pixels=pixels,
                        split=split,
                        seed=seed,
                        epochs=args.epochs,
                    )
                    t0 = time.perf_counter()
                    _, m = fit(cfg, ds, verbose=False)
                    wall = time.perf_counter() - t0
                    print(
                        f"{model:>5} {pixels:>6} {split:>6} {seed:>4} {m['test_loss']:>9.4f} "
                        f"{m['test_accuracy']:>8.4f} {m['median_step_ms']:>7.2f} {wall:>6.1f}",
                        flush=True,
                    )
                    if args.jsonl:
                        row = {"pixels": pixels, "split": split, "seed": seed, "wall_s": wall}
                        row.update({k: v for k, v in m.items() if k != "skipped_files"})
                        with open(args.jsonl, "a") as fh:
                            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
