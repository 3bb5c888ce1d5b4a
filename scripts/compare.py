"""Trains the Flax port and the Keras reference on the same split, over seeds; prints one table.

    pip install -e ".[keras]"
    python scripts/compare.py ../shared/data/gtsrb   # Models 1 and 2, unit and raw, 5 seeds
    python scripts/compare.py --quick                # synthetic signs, seconds

For each model and pixel mode the two frameworks are "comparable" when their mean accuracies
differ by less than the larger of the two standard deviations and their stuck counts (runs below
10% accuracy) are alike (differ by at most one run).
"""

import argparse
import json
import statistics

import keras_ref  # noqa: F401  (pins Keras' TensorFlow backend first)
from cnn_jax import data
from cnn_jax.config import Config
from cnn_jax.data.synthetic import make_synthetic
from cnn_jax.train import fit as jax_fit
from keras_ref.train import fit as keras_fit

STUCK = 0.10


def _fit(framework: str, cfg: Config, ds) -> dict:
    if framework == "jax":
        return jax_fit(cfg, ds, verbose=False)[1]
    return keras_fit(cfg, ds)[1]


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (model, pixels, framework) with accuracy statistics over seeds."""
    rows = []
    keys = sorted({(r["model"], r["pixels"], r["framework"]) for r in runs})
    for model, pixels, framework in keys:
        group = [
            r
            for r in runs
            if (r["model"], r["pixels"], r["framework"]) == (model, pixels, framework)
        ]
        accs = [r["test_accuracy"] for r in group]
        rows.append(
            {
                "model": model,
                "pixels": pixels,
                "framework": framework,
                "seeds": len(accs),
                "mean": statistics.mean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "min": min(accs),
                "max": max(accs),
                "stuck": sum(a < STUCK for a in accs),
                "ms_per_step": statistics.median(r["median_step_ms"] for r in group),
                "params": group[0]["params"],
            }
        )
    return rows


def comparable(jax_row: dict, keras_row: dict) -> bool:
    close = abs(jax_row["mean"] - keras_row["mean"]) < max(jax_row["std"], keras_row["std"])
    return close and abs(jax_row["stuck"] - keras_row["stuck"]) <= 1


def table(rows: list[dict]) -> str:
    head = ["model", "pixels", "framework", "mean acc", "std", "min", "max", "stuck", "ms/step"]
    head += ["params", "comparable"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    by_key = {(r["model"], r["pixels"], r["framework"]): r for r in rows}
    for r in rows:
        other = by_key.get((r["model"], r["pixels"], "keras" if r["framework"] == "jax" else "jax"))
        verdict = "-" if other is None else ("yes" if comparable(r, other) else "no")
        lines.append(
            f"| {r['model']} | {r['pixels']} | {r['framework']} | {r['mean']:.4f} | {r['std']:.4f} "
            f"| {r['min']:.4f} | {r['max']:.4f} | {r['stuck']}/{r['seeds']} | "
            f"{r['ms_per_step']:.2f} | {r['params']:,} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="data folder; none: synthetic signs")
    p.add_argument("--models", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pixels", nargs="+", default=["unit", "raw"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="synthetic data, 1 epoch, 2 seeds")
    p.add_argument("--jsonl", help="append every run to this file as a JSON line")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.seeds = 1, args.seeds[:2]
        ds = make_synthetic(12)
    else:
        ds = data.load_folder(args.data) if args.data else make_synthetic(100)
    runs = []
    for model in args.models:
        for pixels in args.pixels:
            for seed in args.seeds:
                cfg = Config(model=model, pixels=pixels, seed=seed, epochs=args.epochs)
                for framework in ("jax", "keras"):
                    m = _fit(framework, cfg, ds)
                    run = {"framework": framework, "pixels": pixels, "seed": seed}
                    run.update(
                        {
                            k: m[k]
                            for k in (
                                "model",
                                "params",
                                "test_loss",
                                "test_accuracy",
                                "median_step_ms",
                            )
                        }
                    )
                    runs.append(run)
                    print(json.dumps(run), flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a") as fh:
                            fh.write(json.dumps(run) + "\n")
    print(table(summarise(runs)))


if __name__ == "__main__":
    main()
