"""`cnn-jax train`: the data loaded, `fit` run, and Ctrl-C or SIGTERM turned into a checkpoint."""

import signal
import sys
import time
from pathlib import Path

from cnn_jax import backend, distributed, files, signals
from cnn_jax import config as config_lib
from cnn_jax import data as data_lib
from cnn_jax.cli.options import given_settings
from cnn_jax.config import Config
from cnn_jax.data import load_configured
from cnn_jax.data.splits import track_name
from cnn_jax.errors import UserError
from cnn_jax.report import test_line


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


def command(args) -> int:
    # Nothing is open or written until the data loads: a signal before that ends it there.
    with signals.ending_at_once():
        from cnn_jax.callbacks import DIVERGED_EXIT, Diverged
        from cnn_jax.train import Interrupted, fit  # imports JAX: keep `cnn-jax --help` fast

        cfg, kept = _config(args)
        _start(args, cfg)
    verbose = not args.quiet and distributed.is_main()  # one process speaks for the run
    _say_kept(cfg, kept)
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
        except (RuntimeError, ValueError) as e:  # JaxRuntimeError, or orbax's, from a collective
            if not distributed.lost_peer(e):
                raise
            why = distributed.peer_lost_message(e, workdir)
            print(f"cnn-jax train: error: {why}", file=sys.stderr)
            return distributed.PEER_LOST_EXIT
        except Interrupted as e:
            print(f"cnn-jax train: interrupted: {e}", file=sys.stderr)
            print(f"to resume: cnn-jax train ... --workdir {workdir}", file=sys.stderr)
            return 128 + stop.signum
    if stop.signum is not None:  # after the last check: the run is whole, the signal is not lost
        print(f"cnn-jax train: interrupted ({signals.Signals(stop.signum).name}) after the run "
              f"finished; its results are in {workdir}", file=sys.stderr)  # fmt: skip
        return 128 + stop.signum
    if verbose:
        n_train, n_test, ms = metrics["n_train"], metrics["n_test"], metrics["median_step_ms"] or 0
        print(
            f"model {cfg.model}: {metrics['params']:,} parameters, {n_train:,} train / "
            f"{n_test:,} test images, median {ms:.2f} ms/step"
        )
        print(f"run folder: {workdir.resolve()}")
        for line in _reading_notes(cfg, ds, metrics):
            print(line)
    if distributed.is_main():
        print(test_line(metrics["test_loss"], metrics["test_accuracy"]))
    return 0


def _start(args, cfg: Config) -> None:
    """Starts JAX as the run needs it: its CPU split, the other processes joined; a missing
    GPU, or a build of oneDNN's convolutions that fails, is named before the data loads."""
    from cnn_jax import onednn
    from cnn_jax.models import trains_with_onednn

    if cfg.devices is None and not _joining(args) and cfg.platform in (None, "cpu"):
        # before JAX starts: one device if oneDNN would take it (its own test, below)
        wants = trains_with_onednn(cfg.model, cfg.conv, cfg.dtype)
        backend.split_cpu(cfg.model, cfg.batch_size, wants)
    _join(args)  # before anything touches the backend
    devices = backend.devices(cfg.platform)  # starts JAX; every process's, when joined
    count = cfg.devices or len(devices)
    if trains_with_onednn(cfg.model, cfg.conv, cfg.dtype, devices[0].platform, count):
        onednn.load()


def _reading_notes(cfg: Config, ds: data_lib.Dataset, metrics: dict) -> list[str]:
    """What the test line below them measures: the epoch that validation chose, whether the
    test side holds photos of signs the network trained on, and with --ema what the last
    step's weights scored beside the average."""
    notes = []
    if "val_accuracy" in metrics:
        share = f"{cfg.val_size:g} of the training side"
        notes.append(f"model: epoch {metrics['selected_epoch']}, chosen by validation accuracy "
                     f"{metrics['val_accuracy']:.4f} ({share})")  # fmt: skip
    if cfg.split == "random" and any(track_name(p, 0) for p in ds.paths[:1000]):
        notes.append("note: the random split put photos of the same physical signs (GTSRB "
                     "tracks) on both sides, so the test figure reads higher than on signs "
                     "never seen; --split track measures those")  # fmt: skip
    if "last_weights_test_accuracy" in metrics:
        notes.append(f"the last step's weights, without --ema's average: test loss "
                     f"{metrics['last_weights_test_loss']:.4f}, accuracy "
                     f"{metrics['last_weights_test_accuracy']:.4f}")  # fmt: skip
    return notes


def _joining(args) -> bool:
    """Whether the run spans several processes (each then has the CPU devices it was given)."""
    given = distributed.settings(args.coordinator, args.num_processes, args.process_id)
    return bool(given or args.distributed)


def _join(args) -> None:
    """Joins the run's other processes, when there are any (distributed.py)."""
    given = distributed.settings(args.coordinator, args.num_processes, args.process_id)
    if (given or args.distributed) and not args.workdir:
        raise UserError("a run of several processes needs --workdir, on storage all of them reach")
    distributed.join(given, args.distributed == "auto", args.join_timeout, args.heartbeat_timeout)


def _config(args) -> tuple[Config, dict]:
    """The run's configuration: the recipe, then the options given; refused when it cannot run.
    Also the settings kept from the recipe as the run saved it, said once the processes know
    which of them speaks."""
    given = given_settings(args)
    if given.get("data"):  # an empty one ($DATA unset) stays empty, and Config refuses it
        given["data"] = str(Path(given["data"]).resolve())
    recipe = given.pop("recipe", None)
    kept = _recipe_as_saved(recipe, given, args)
    cfg = config_lib.with_recipe(recipe, **kept, **given)
    _refuse_no_effect(given, cfg)
    _refuse_conv(cfg)
    # Config allows 0 epochs (an imported Keras model has trained none here); a run needs one.
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be at least 1, not {cfg.epochs}")
    for name, value in (("--save-every", args.save_every), ("--log-every", args.log_every)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, not {value}")
    return cfg, kept


def _say_kept(cfg: Config, kept: dict) -> None:
    """Names each setting a resumed run keeps from its recipe as it began, once: from process
    0, which is known only after the processes join."""
    if not distributed.is_main():
        return
    for key, value in kept.items():
        print(f"resuming with the run's {config_lib.flag(key)} {value} (--recipe {cfg.recipe} "
              f"now sets {config_lib.RECIPE_SETTINGS[cfg.recipe][key]})",
              file=sys.stderr)  # fmt: skip


def _recipe_as_saved(recipe: str | None, given: dict, args) -> dict:
    """The settings a resumed run keeps from the recipe as it was when the run began.

    A recipe's defaults may change between versions (the strong recipe's batch went from 64 to
    16): the same command must still resume the run. Only settings the user did not give are
    kept; an unreadable config.json keeps none, and the checkpoint's own check then decides.
    """
    if recipe is None or args.restart or not args.workdir:
        return {}
    saved = files.run_config(args.workdir)
    if saved is None or saved.get("recipe") != recipe:
        return {}
    saved = config_lib.saved_settings(saved)
    now = config_lib.RECIPE_SETTINGS.get(recipe, {})
    return {k: saved[k] for k in now if k not in given and k in saved and saved[k] != now[k]}


def _refuse_no_effect(given: dict, cfg: Config) -> None:
    """An option given that would change nothing is refused before any work: the user meant
    something by it, and a run that ignores it for an hour helps nobody."""
    strengths = ", ".join(config_lib.strength_flag(k) for k in given.get("strengths", {}))
    warmup = "warmup_epochs" in given and cfg.warmup_epochs > 0
    checks = [
        (strengths and not cfg.augment,
         f"{strengths} has no effect without --augment: add --augment, or drop it"),
        (warmup and cfg.schedule == "constant",
         "--warmup-epochs has no effect with --schedule constant: add --schedule cosine, or drop "
         "it"),
        (warmup and cfg.schedule != "constant" and cfg.warmup_epochs >= cfg.epochs,
         f"--warmup-epochs {cfg.warmup_epochs:g} is not below --epochs {cfg.epochs}: the learning "
         "rate would never decay from its peak; give fewer warmup epochs"),
        ("synthetic_per_class" in given and cfg.data,
         "--synthetic-per-class has no effect with a data argument: drop one of them"),
        (cfg.distill_views and not cfg.augment,
         "--distill-views has no effect without --augment (the views are the images): add "
         "--augment, or drop it"),
    ]  # fmt: skip
    for applies, why in checks:
        if applies:
            raise UserError(why)


def _refuse_conv(cfg: Config) -> None:
    """`--conv onednn` where it cannot run, refused before the data loads."""
    if cfg.conv != "onednn":
        return
    from cnn_jax import onednn

    reason = onednn.missing()
    if reason is None and cfg.platform not in (None, "cpu"):
        reason = f"it is for the CPU, not --platform {cfg.platform}; leave --conv at auto there"
    if reason is None and (cfg.devices or 1) > 1:
        reason = f"it trains on one device, not --devices {cfg.devices}"
    if reason is None and cfg.dtype != "float32":
        reason = f"it computes in float32 only: drop --dtype {cfg.dtype} or --conv onednn"
    if reason is not None:
        raise UserError(f"--conv onednn: {reason}")


class _StopOnSignal:
    """Turns the first Ctrl-C or SIGTERM into a request that training polls after each call.

    Raising inside a step would lose the state that step had donated; a second Ctrl-C still
    raises KeyboardInterrupt at once (but inside a garbage-collection callback). A signal that
    came before training started, and whose exception was lost (Python drops one raised inside
    a garbage-collection callback), is a request too: no signal is ignored.
    """

    def __init__(self):
        self.signum = signals.RECEIVED[-1] if signals.RECEIVED else None

    def __call__(self) -> bool:
        # Every process asks at the same step, so that all of them stop there together. A
        # signal that comes while the others are asked (a multi-process run waits there most
        # of the time) is kept for the next step: assigning the answer would erase it.
        agreed = distributed.first_signal(self.signum)
        if agreed is not None:
            self.signum = agreed
        return agreed is not None

    def _handle(self, signum, frame):
        signals.RECEIVED.append(signum)
        # Python would drop an exception raised in a garbage-collection callback: the first
        # request stands, and stops the run after this call.
        if self.signum is not None and signum == signal.SIGINT:
            if not signals.in_gc_callback(frame):
                raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
