"""Runs one `cnn-jax train` command for several seeds and prints each run and their mean.

    python scripts/seeds.py --seeds 0 1 2 --out runs/m3 -- ../shared/data/gtsrb --model 3 \
        --recipe strong --split track

Everything after `--` goes to `cnn-jax train` as typed, plus `--seed S --workdir OUT/seedS`.
Each run's figures come from its metrics.json; wall time includes loading and compiling. One
JSON line per run goes to --jsonl if given.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/seeds", help="run folders go to OUT/seed<S>")
    p.add_argument("--jsonl", help="append one JSON line per run to this file")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then cnn-jax train's")
    args = p.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

    print(f"cnn-jax train {' '.join(train_args)}", flush=True)
    print(f"{'seed':>4} {'test_acc':>8} {'test_loss':>9} {'epoch':>5} {'ms/step':>8} "
          f"{'wall_s':>7} {'peak_MB':>8}", flush=True)  # fmt: skip
    accuracies = []
    for seed in args.seeds:
        workdir = Path(args.out) / f"seed{seed}"
        command = [sys.executable, "-m", "cnn_jax", "train", *train_args, "--seed", str(seed)]
        t0 = time.perf_counter()
        subprocess.run([*command, "--workdir", str(workdir), "--quiet"], check=True)
        wall = time.perf_counter() - t0
        m = json.loads((workdir / "metrics.json").read_text())
        accuracies.append(m["test_accuracy"])
        print(f"{seed:>4} {m['test_accuracy']:>8.4f} {m['test_loss']:>9.4f} "
              f"{m['selected_epoch']:>5} {m['median_step_ms']:>8.1f} {wall:>7.0f} "
              f"{m['peak_rss_mb']:>8.0f}", flush=True)  # fmt: skip
        if m.get("member_test_accuracy"):
            print("     members: " + " ".join(f"{a:.4f}" for a in m["member_test_accuracy"]))
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"args": train_args, "seed": seed, "wall_s": wall, **m}) + "\n")
    if len(accuracies) > 1:
        print(f"mean {statistics.mean(accuracies):.4f}, range {min(accuracies):.4f}-"
              f"{max(accuracies):.4f} over {len(accuracies)} seeds")  # fmt: skip


if __name__ == "__main__":
    main()
