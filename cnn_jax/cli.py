"""The `cnn-jax` command: parses arguments, calls one library function per command, prints."""

import argparse
import importlib.metadata
import json
import os
import signal
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
    t.add_argument(
        "--conv", choices=("auto", "lax", "matmul"), default=d.conv, help="convolution formulation"
    )
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype)
    t.add_argument("--devices", type=int, help="data-parallel over N local devices (default: all)")
    t.add_argument(
        "--steps-per-call",
        type=int,
        default=d.steps_per_call,
        help="training steps per compiled call (a scan; pays on accelerators)",
    )
    t.add_argument("--synthetic-per-class", type=int, default=d.synthetic_per_class)
    t.add_argument("--workdir", help="run folder (default: runs/model<N>-<time>)")
    t.add_argument("--cache-dir", help="decoded-image cache (default: $XDG_CACHE_HOME/cnn-jax)")
    t.add_argument("--no-cache", action="store_true", help="decode every image afresh")
    t.add_argument("--quiet", action="store_true", help="only the closing test line")
    t.add_argument("--restart", action="store_true", help="delete the workdir's checkpoints first")
    t.add_argument(
        "--resume-fallback",
        action="store_true",
        help="resume from the newest intact checkpoint when newer ones are corrupt",
    )
    t.add_argument("--save-every", type=int, help="also save a checkpoint every N steps")

    e = sub.add_parser("evaluate", help="loss and accuracy (overall and per class) of a checkpoint")
    e.add_argument("checkpoint", help="a run folder (its best checkpoint) or a step's folder")
    e.add_argument("data", nargs="?", help="data folder; none: the run's own test split")
    e.add_argument("--layout", choices=data_lib.LAYOUTS, default="auto")
    e.add_argument("--cache-dir")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pr = sub.add_parser("predict", help="classify image files with a checkpoint")
    pr.add_argument("checkpoint")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--json", action="store_true")

    i = sub.add_parser("info", help="what a checkpoint holds, with a digest of its parameters")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")

    # Commands from other packages (keras_ref's import-keras and export-keras): cnn_jax itself
    # never imports them; they register through this entry-point group.
    for entry in importlib.metadata.entry_points(group="cnn_jax.commands"):
        entry.load()(sub)
    return p


def load_dataset(cfg: Config, cache_dir=None, use_cache=True, verbose=True) -> data_lib.Dataset:
    """The configured data folder, or the built-in synthetic signs when there is none."""
    t0 = time.perf_counter()
    ds = data_lib.load_configured(cfg, cache_dir, use_cache)
    source = cfg.data or "built-in synthetic signs"
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
    from cnn_jax.train import Interrupted, fit  # imports JAX: keep `cnn-jax --help` fast

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
        conv=args.conv,
        dtype=args.dtype,
        devices=args.devices,
        steps_per_call=args.steps_per_call,
    )
    verbose = not args.quiet
    if args.save_every is not None and args.save_every < 1:
        raise ValueError("--save-every must be at least 1")
    if args.steps_per_call < 1:
        raise ValueError("--steps-per-call must be at least 1")
    ds = load_dataset(cfg, args.cache_dir, not args.no_cache, verbose)
    workdir = Path(args.workdir or f"runs/model{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    with _StopOnSignal() as stop:
        try:
            _, metrics = fit(
                cfg,
                ds,
                workdir,
                verbose=verbose,
                restart=args.restart,
                resume_fallback=args.resume_fallback,
                save_every=args.save_every,
                should_stop=stop,
            )
        except Interrupted as e:
            print(f"cnn-jax train: interrupted: {e}", file=sys.stderr)
            print(f"to resume: cnn-jax train ... --workdir {workdir}", file=sys.stderr)
            return 128 + stop.signum
    if verbose:
        n_train, n_test, ms = metrics["n_train"], metrics["n_test"], metrics["median_step_ms"] or 0
        print(
            f"model {cfg.model}: {metrics['params']:,} parameters, {n_train:,} train / "
            f"{n_test:,} test images, median {ms:.2f} ms/step"
        )
        print(f"run folder: {workdir.resolve()}")
    print(test_line(metrics["test_loss"], metrics["test_accuracy"]))
    return 0


class _StopOnSignal:
    """Turns the first Ctrl-C or SIGTERM into a request that training polls after each step.

    Raising inside a step would lose the state that step had donated; a second Ctrl-C still
    raises KeyboardInterrupt at once.
    """

    def __init__(self):
        self.signum = None

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _evaluate(args) -> int:
    from cnn_jax.inference import evaluate_checkpoint, load_checkpoint

    result = evaluate_checkpoint(
        load_checkpoint(args.checkpoint), args.data, args.layout, args.cache_dir
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"checkpoint: {result['checkpoint']}")
    print(
        f"data: {result['data']} ({result['n']:,} images, {len(result['skipped_files'])} skipped)"
    )
    print(f"{'class':>5}  {'images':>6}  {'accuracy':>8}  sign")
    for row in result["per_class"]:
        print(f"{row['class']:>5}  {row['n']:>6}  {row['accuracy']:>8.4f}  {row['name']}")
    print(test_line(result["loss"], result["accuracy"]))
    return 0


def _predict(args) -> int:
    from cnn_jax.inference import load_checkpoint, predict_files

    results = predict_files(load_checkpoint(args.checkpoint), args.images, args.top_k)
    failed = 0
    for path, top in results:
        if isinstance(top, str):
            failed += 1
            print(f"cnn-jax predict: error: {top}", file=sys.stderr)
        elif not args.json:
            print(path)
            for rank, (c, name, p) in enumerate(top, start=1):
                print(f"  {rank}. {p:7.2%}  {name} (class {c})")
    if args.json:
        rows = [
            {"path": path, "error": top}
            if isinstance(top, str)
            else {
                "path": path,
                "top": [{"class": c, "name": n, "probability": p} for c, n, p in top],
            }
            for path, top in results
        ]
        print(json.dumps(rows, indent=2))
    return 2 if failed else 0


def _info(args) -> int:
    from cnn_jax.checkpoint import params_digest
    from cnn_jax.inference import load_checkpoint

    r = load_checkpoint(args.checkpoint)
    info = {
        "checkpoint": str(r.directory),
        "model": r.config.model,
        "params": r.param_count(),
        "step": r.step,
        "epoch": r.meta["epoch"],
        "step_in_epoch": r.meta["step_in_epoch"],
        "test_accuracy": r.meta.get("test_accuracy"),
        "params_sha256": params_digest(r.params),
        "config": r.meta["config"],
        "epochs": r.meta["epochs"],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("checkpoint", "model", "params", "step", "epoch", "step_in_epoch"):
        print(f"{key}: {info[key]}")
    acc = info["test_accuracy"]
    print(f"test_accuracy: {'-' if acc is None else f'{acc:.4f}'}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    for n, e in enumerate(info["epochs"], start=1):
        print(f"epoch {n}: loss {e['train_loss']:.4f} - accuracy {e['train_accuracy']:.4f}")
    print(f"params_sha256: {info['params_sha256']}")
    return 0


def _quiet_unraisable(unraisable) -> None:
    """Drops the 'Event loop is closed' errors that orbax's reader leaves behind when a damaged
    checkpoint fails to read (the failure itself is reported as one line); shows the rest."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def main(argv=None) -> int:
    """Entry point; user errors become one line on stderr and exit code 2."""
    args = _parser().parse_args(argv)
    sys.unraisablehook = _quiet_unraisable
    commands = {"train": _train, "evaluate": _evaluate, "predict": _predict, "info": _info}
    try:
        return commands.get(args.command, getattr(args, "run", None))(args)
    except BrokenPipeError:  # `cnn-jax info ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:
        print(f"cnn-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cnn-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
