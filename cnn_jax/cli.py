"""The `cnn-jax` command: parses arguments, calls one library function per command, prints."""

import argparse
import sys
import time
from pathlib import Path

from cnn_jax import data as data_lib
from cnn_jax.config import Config
from cnn_jax.report import test_line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnn-jax", description="The GTSRB traffic-sign CNNs of the Keras tutorial, in JAX."
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train Model 1 or 2 on a GTSRB folder or synthetic signs")
    t.add_argument(
        "data", nargs="?", help="data folder (CS50 or official GTSRB layout); none: synthetic"
    )
    d = Config()
    t.add_argument("--model", type=int, choices=(1, 2), default=d.model)
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.learning_rate, help="Adam learning rate")
    t.add_argument("--optimizer", choices=("keras-adam", "adam"), default=d.optimizer)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--pixels", choices=data_lib.PIXELS, default=d.pixels)
    t.add_argument("--test-size", type=float, default=d.test_size)
    t.add_argument("--split", choices=data_lib.SPLITS, default=d.split)
    t.add_argument("--layout", choices=data_lib.LAYOUTS, default=d.layout)
    t.add_argument("--image-size", type=int, default=d.image_size)
    t.add_argument("--num-classes", type=int, default=d.num_classes)
    t.add_argument("--eval-every-epoch", action="store_true")
    t.add_argument("--synthetic-per-class", type=int, default=d.synthetic_per_class)
    t.add_argument("--workdir", help="run folder (default: runs/model<N>-<time>)")
    t.add_argument("--cache-dir", help="decoded-image cache (default: $XDG_CACHE_HOME/cnn-jax)")
    t.add_argument("--no-cache", action="store_true", help="decode every image afresh")
    t.add_argument("--quiet", action="store_true", help="only the closing test line")
    return p


def load_dataset(cfg: Config, cache_dir=None, use_cache=True, verbose=True) -> data_lib.Dataset:
    """The configured data folder, or the built-in synthetic signs when there is none."""
    t0 = time.perf_counter()
    if cfg.data is None:
        from cnn_jax.synthetic import make_synthetic

        ds = make_synthetic(cfg.synthetic_per_class, cfg.image_size, cfg.num_classes or 43)
        source = "built-in synthetic signs"
    else:
        ds = data_lib.load_folder(
            cfg.data,
            layout=cfg.layout,
            image_size=cfg.image_size,
            cache_dir=cache_dir,
            use_cache=use_cache,
        )
        source = cfg.data
    if verbose:
        print(
            f"loaded {len(ds.labels):,} images of {ds.num_classes} classes from {source} "
            f"in {time.perf_counter() - t0:.2f}s; skipped {len(ds.skipped)} unreadable files"
        )
        for path, reason in ds.skipped[:10]:
            print(f"  skipped {path}: {reason}")
        if len(ds.skipped) > 10:
            print(f"  ... and {len(ds.skipped) - 10} more (all listed in metrics.json)")
    return ds


def _train(args) -> int:
    from cnn_jax.train import fit  # imports JAX: keep `cnn-jax --help` fast

    cfg = Config(
        model=args.model,
        data=str(Path(args.data).resolve()) if args.data else None,
        layout=args.layout,
        image_size=args.image_size,
        num_classes=args.num_classes,
        pixels=args.pixels,
        test_size=args.test_size,
        split=args.split,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        eval_every_epoch=args.eval_every_epoch,
        synthetic_per_class=args.synthetic_per_class,
    )
    verbose = not args.quiet
    ds = load_dataset(cfg, args.cache_dir, not args.no_cache, verbose)
    workdir = Path(args.workdir or f"runs/model{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    _, metrics = fit(cfg, ds, workdir, verbose=verbose)
    if verbose:
        print(
            f"model {cfg.model}: {metrics['params']:,} parameters, {metrics['n_train']:,} train / "
            f"{metrics['n_test']:,} test images, median {metrics['median_step_ms'] or 0:.2f} ms/step"
        )
        print(f"run folder: {workdir.resolve()}")
    print(test_line(metrics["test_loss"], metrics["test_accuracy"]))
    return 0


def main(argv=None) -> int:
    """Entry point; user errors become one line on stderr and exit code 2."""
    args = _parser().parse_args(argv)
    try:
        return {"train": _train}[args.command](args)
    except (ValueError, OSError) as e:
        print(f"cnn-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cnn-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
