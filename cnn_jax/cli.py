"""The `cnn-jax` command: parses arguments, calls one library function per command, prints."""

import argparse
import dataclasses
import importlib.metadata
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from cnn_jax import backend, signals
from cnn_jax import config as config_lib
from cnn_jax import data as data_lib
from cnn_jax.config import Config
from cnn_jax.data import load_configured
from cnn_jax.errors import UserError
from cnn_jax.report import strict_json, test_line


def _steps_per_call(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number >= 1, not {text!r}")
    return value


def _add_option(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    """The option for one Config field, from its metadata (help, choices, flag name).

    An option left out is absent from the parsed arguments (argparse.SUPPRESS), so that a
    --recipe can tell the options a user gave, which win, from those it may set.
    """
    meta, default = field.metadata, field.default
    unset = argparse.SUPPRESS
    if meta["flag"] == "":  # the positional data argument
        parser.add_argument(field.name, nargs="?", default=unset, help=meta["help"])
        return
    name = config_lib.flag(field.name)
    help = (
        meta["help"] if default in (None, False, True) else f"{meta['help']} (default: {default})"
    )
    if default is True:
        action = argparse.BooleanOptionalAction
        parser.add_argument(name, dest=field.name, action=action, default=unset, help=help)
    elif default is False:
        parser.add_argument(name, dest=field.name, action="store_true", default=unset, help=help)
    else:
        kind = _steps_per_call if field.name == "steps_per_call" else config_lib.kind(field)
        parser.add_argument(
            name,
            dest=field.name,
            type=kind,
            choices=meta["choices"],
            default=unset,
            metavar=None if meta["choices"] else name.lstrip("-").replace("-", "_").upper(),
            help=help,
        )


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Ends each option's help with its default, except flags and options whose help already
    says what leaving them out does."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line and exit code 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cnn-jax", description="The GTSRB traffic-sign CNNs of the Keras tutorial, in JAX."
    )
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help):
        # Every option's help line ends with its default.
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpWithDefaults)

    _train_options(command("train", "train Model 1, 2 or 3 on a GTSRB folder, a packed .npz or "
                                    "synthetic signs"))  # fmt: skip
    _checkpoint_commands(command)
    report = "one self-contained HTML page of a run: curves, per-class accuracy, confusion "
    _report_options(command("report", report + "matrix, the worst mistakes, config and timings"))
    _pack_options(command("pack", "decode a data folder into one compressed .npz for train and "
                          "evaluate"))  # fmt: skip
    # Commands from other packages (keras_ref's import-keras and export-keras): cnn_jax itself
    # never imports them; they register through this entry-point group.
    for entry in importlib.metadata.entry_points(group="cnn_jax.commands"):
        entry.load()(sub)
    return p


def _train_options(t: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(Config):
        _add_option(t, field)
    t.add_argument("--workdir", help="run folder; none: runs/model<N>-<time>")
    t.add_argument("--cache-dir", help="decoded-image cache; none: $XDG_CACHE_HOME/cnn-jax")
    t.add_argument("--no-cache", action="store_true", help="decode every image afresh")
    t.add_argument("--quiet", action="store_true", help="only the closing test line")
    t.add_argument("--restart", action="store_true", help="delete the workdir's checkpoints first")
    t.add_argument(
        "--resume-fallback",
        action="store_true",
        help="resume from the newest intact checkpoint when newer ones are damaged",
    )
    t.add_argument("--save-every", type=int, help="also save a checkpoint every N steps")
    t.add_argument("--log-every", type=int, default=100, help="TensorBoard scalars every N steps")


def _checkpoint_commands(command) -> None:
    """evaluate, predict and info: the commands that read a checkpoint."""

    def reads_checkpoint(name, help, computes=True):
        p = command(name, help)
        p.add_argument("checkpoint", help="a run folder (its best checkpoint) or a step's folder")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        if computes:
            p.add_argument(
                "--platform", choices=backend.PLATFORMS, help="where to run; none: JAX's default"
            )
        return p

    e = reads_checkpoint("evaluate", "loss and accuracy (overall and per class) of a checkpoint")
    e.add_argument("data", nargs="?", help="data folder or packed .npz; none: the run's test split")
    e.add_argument("--layout", choices=config_lib.LAYOUTS, default="auto", help="folder layout")
    e.add_argument("--cache-dir", help="decoded-image cache; none: $XDG_CACHE_HOME/cnn-jax")
    pr = reads_checkpoint("predict", "classify image files with a checkpoint")
    pr.add_argument("images", nargs="+", help="image files (any format OpenCV or Pillow reads)")
    pr.add_argument("--top-k", type=int, default=3, help="how many classes to list per image")
    reads_checkpoint("info", "what a checkpoint holds, with a digest of its parameters", False)


def _report_options(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("run_dir", metavar="RUN", help="a finished run's folder")
    rp.add_argument("data", nargs="?", help="data folder or .npz to test on; none: the test split")
    rp.add_argument("--out", help="the .html file to write; none: RUN/report.html")
    rp.add_argument("--compare", nargs="+", default=[], metavar="RUN2",
                    help="other runs whose curves share the axes")  # fmt: skip
    rp.add_argument("--layout", choices=config_lib.LAYOUTS, default="auto", help="folder layout")
    rp.add_argument("--cache-dir", help="decoded-image cache; none: $XDG_CACHE_HOME/cnn-jax")
    rp.add_argument("--platform", choices=backend.PLATFORMS, help="where to run; none: JAX's")


def _pack_options(pk: argparse.ArgumentParser) -> None:
    pk.add_argument("data", help="data folder (CS50 or official GTSRB layout)")
    pk.add_argument("out", help="the .npz file to write")
    pk.add_argument("--layout", choices=config_lib.LAYOUTS, default="auto", help="folder layout")
    pk.add_argument("--image-size", type=int, default=Config().image_size, help="resize to N x N")
    pk.add_argument("--decoder", choices=config_lib.DECODERS, default=Config().decoder,
                    help="opencv: the tutorial's pixels; pillow: smoothing")  # fmt: skip


def load_dataset(cfg: Config, cache_dir=None, use_cache=True, verbose=True) -> data_lib.Dataset:
    """The configured data folder, or the built-in synthetic signs when there is none."""
    t0 = time.perf_counter()
    ds = load_configured(cfg, cache_dir, use_cache)
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
    # XLA reads its flags when JAX starts a backend: before anything below imports JAX.
    backend.use_deterministic_ops(getattr(args, "deterministic", True))
    signals.check()
    from cnn_jax.guards import DIVERGED_EXIT, Diverged
    from cnn_jax.train import Interrupted, fit  # imports JAX: keep `cnn-jax --help` fast

    signals.check()  # a signal whose exception the imports swallowed ends it here

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if f.name in args}
    if given.get("data"):  # an empty one ($DATA unset) stays empty, and Config refuses it
        given["data"] = str(Path(given["data"]).resolve())
    cfg = config_lib.with_recipe(given.pop("recipe", None), **given)
    verbose = not args.quiet
    # Config allows 0 epochs (an imported Keras model has trained none here); a run needs one.
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be at least 1, not {cfg.epochs}")
    for name, value in (("--save-every", args.save_every), ("--log-every", args.log_every)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, not {value}")
    backend.devices(cfg.platform)  # a missing GPU is named before the data loads
    signals.check()
    ds = load_dataset(cfg, args.cache_dir, not args.no_cache, verbose)
    signals.check()  # nothing trains after a signal that came while loading
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
                log_every=args.log_every,
            )
        except Diverged as e:
            print(f"cnn-jax train: error: {e}", file=sys.stderr)
            return DIVERGED_EXIT
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
    """Turns the first Ctrl-C or SIGTERM into a request that training polls after each call.

    Raising inside a step would lose the state that step had donated; a second Ctrl-C still
    raises KeyboardInterrupt at once. A signal that came before training started, and whose
    exception was lost (Python drops one raised inside a garbage-collection callback), is a
    request too: no signal is ignored.
    """

    def __init__(self):
        self.signum = signals.RECEIVED[-1] if signals.RECEIVED else None

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        signals.RECEIVED.append(signum)
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
        load_checkpoint(args.checkpoint, args.platform), args.data, args.layout, args.cache_dir
    )
    if args.json:
        print(strict_json(result))
        return 0
    print(f"checkpoint: {result['checkpoint']}")
    print(
        f"data: {result['data']} ({result['n']:,} images, {len(result['skipped_files'])} skipped)"
    )
    print(f"{'class':>5}  {'images':>6}  {'accuracy':>8}  sign")
    for row in result["per_class"]:
        print(f"{row['class']:>5}  {row['n']:>6}  {row['accuracy']:>8.4f}  {row['name']}")
    for m, acc in enumerate(result.get("member_accuracy", [])):
        print(f"ensemble member {m}: accuracy {acc:.4f}")
    print(test_line(result["loss"], result["accuracy"]))
    return 0


def _predict(args) -> int:
    from cnn_jax.inference import load_checkpoint, predict_files

    restored = load_checkpoint(args.checkpoint, args.platform)
    results = predict_files(restored, args.images, args.top_k)
    failed = 0
    for path, top, members in results:
        if isinstance(top, str):
            failed += 1
            print(f"cnn-jax predict: error: {top}", file=sys.stderr)
        elif not args.json:
            print(path)
            for rank, (c, name, p) in enumerate(top, start=1):
                print(f"  {rank}. {p:7.2%}  {name} (class {c})")
            for m, (c, name, p) in enumerate(members or []):
                print(f"     member {m}: {p:7.2%}  {name} (class {c})")
    if args.json:
        rows = [
            {"path": path, "error": top}
            if isinstance(top, str)
            else {
                "path": path,
                "top": [{"class": c, "name": n, "probability": p} for c, n, p in top],
                **(
                    {"members": [{"class": c, "name": n, "probability": p} for c, n, p in members]}
                    if members
                    else {}
                ),  # fmt: skip
            }
            for path, top, members in results
        ]
        print(strict_json(rows))
    return 2 if failed else 0


def _report(args) -> int:
    from cnn_jax import html_report

    html_report._pyplot()  # a missing extra is named before anything loads
    for folder in [args.run_dir, *args.compare]:
        if not (Path(folder) / "metrics.json").is_file():
            raise UserError(f"{folder} holds no metrics.json: give the folder of a finished run")
    from cnn_jax.inference import load_checkpoint, probabilities_on

    run = Path(args.run_dir)
    tested = probabilities_on(
        load_checkpoint(run, args.platform), args.data, args.layout, args.cache_dir
    )
    out = html_report.write_report(run, Path(args.out or run / "report.html"),
                                   [Path(c) for c in args.compare], tested)  # fmt: skip
    print(f"wrote {out}")
    return 0


def _pack(args) -> int:
    out = Path(args.out)
    if out.suffix != ".npz":
        raise UserError(f"{out} must end in .npz (train and evaluate tell packs by it)")
    if out.exists():
        raise UserError(f"{out} exists: not overwriting it")
    t0 = time.perf_counter()
    ds = data_lib.load_folder(
        args.data, layout=args.layout, image_size=args.image_size, use_cache=False,
        decoder=args.decoder,
    )  # fmt: skip
    data_lib.write_npz(out, ds, compress=True)
    print(
        f"packed {len(ds.labels):,} images of {ds.num_classes} classes "
        f"({args.image_size}x{args.image_size}) from {Path(args.data).resolve()} into {out} "
        f"({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s; "
        f"skipped {len(ds.skipped)} unreadable files"
    )
    for path, reason in ds.skipped[:10]:
        print(f"  skipped {path}: {reason}")
    return 0


def _info(args) -> int:
    from cnn_jax.checkpoint import params_digest
    from cnn_jax.inference import load_checkpoint

    r = load_checkpoint(args.checkpoint)
    info = {
        "checkpoint": str(r.directory),
        "model": r.config.model,
        "params": r.param_count(),
        "step": r.step,
        "epoch": r.meta.epoch,
        "step_in_epoch": r.meta.step_in_epoch,
        "test_accuracy": (r.meta.epochs or [{}])[-1].get("test_accuracy"),
        "val_accuracy": r.meta.val_accuracy,
        "params_sha256": params_digest(r.params),
        "config": r.meta.config,
        "epochs": r.meta.epochs,
    }
    if args.json:
        print(strict_json(info))
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
    """Entry point: bad input is one line on stderr and exit code 2, a bug exit code 1 with its
    traceback, Ctrl-C 130 and SIGTERM 143."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signals.install() if in_main_thread else {}
    try:
        args = _parser().parse_args(argv)
        signals.check()
        return _run(args)
    except KeyboardInterrupt as e:  # before a command started (its own handler reports it)
        print(f"cnn-jax: interrupted ({signals.name(e)})", file=sys.stderr)
        return signals.exit_code(e)
    finally:
        signals.restore(previous)


def _bug(command: str) -> int:
    """Anything but bad input is a bug: shown whole, with exit code 1, never as one line that
    would read like the user's fault."""
    traceback.print_exc()
    print(
        f"cnn-jax {command}: internal error: the traceback above is a bug in cnn-jax or a "
        "library it uses, not a problem with your input; please report it",
        file=sys.stderr,
    )
    return 1


def _run(args) -> int:
    sys.unraisablehook = _quiet_unraisable
    commands = {
        "train": _train,
        "evaluate": _evaluate,
        "predict": _predict,
        "info": _info,
        "pack": _pack,
        "report": _report,
    }
    try:
        return commands.get(args.command, getattr(args, "run", None))(args)
    except BrokenPipeError:  # `cnn-jax info ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as e:
        print(f"cnn-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not the system refusing a file of the user's: ours
            return _bug(args.command)
        # The system refused a named file (missing, no permission, disk full): bad input.
        print(f"cnn-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        return _bug(args.command)
    except KeyboardInterrupt as e:
        print(f"cnn-jax {args.command}: interrupted ({signals.name(e)})", file=sys.stderr)
        return signals.exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
