"""The command line: every command's options, those of `train` built from Config's fields."""

import argparse
import dataclasses
import importlib.metadata

from cnn_jax import backend
from cnn_jax import config as config_lib
from cnn_jax.cli import launch
from cnn_jax.config import Config


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


def _add_option(parser: argparse.ArgumentParser, field: dataclasses.Field, prefix="") -> None:
    """The option for one Config field, from its metadata (help, choices, flag name); one per
    strength for `strengths` (--aug-rotate, ...).

    An option left out is absent from the parsed arguments (argparse.SUPPRESS), so that a
    --recipe can tell the options a user gave, which win, from those it may set.
    """
    meta, default = field.metadata, field.default
    unset = argparse.SUPPRESS
    if meta["flag"] == "":  # the positional data argument
        parser.add_argument(field.name, nargs="?", default=unset, help=meta["help"])
        return
    if field.name == "strengths":
        for strength in dataclasses.fields(config_lib.Strengths):
            _add_option(parser, strength, prefix=config_lib.STRENGTH_PREFIX)
        return
    name = config_lib.strength_flag(field.name) if prefix else config_lib.flag(field.name)
    help = (
        meta["help"]
        if default in (None, False, True, ())
        else f"{meta['help']} (default: {default})"
    )
    dest, metavar = prefix + field.name, name.lstrip("-").replace("-", "_").upper()
    if default == ():  # given once or more, each a text
        parser.add_argument(name, dest=dest, action="append", default=unset, metavar=metavar,
                            help=help)  # fmt: skip
    elif default is True:
        action = argparse.BooleanOptionalAction
        parser.add_argument(name, dest=dest, action=action, default=unset, help=help)
    elif default is False:
        parser.add_argument(name, dest=dest, action="store_true", default=unset, help=help)
    else:
        kind = _steps_per_call if field.name == "steps_per_call" else config_lib.kind(field)
        parser.add_argument(
            name,
            dest=dest,
            type=kind,
            choices=meta["choices"],
            default=unset,
            metavar=None if meta["choices"] else metavar,
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


def parser() -> argparse.ArgumentParser:
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
    _export_options(command("export", "a checkpoint as a file other runtimes run (jax.export, "
                            "TFLite, ONNX), checked in that runtime first"))  # fmt: skip
    _pack_options(command("pack", "decode a data folder into one compressed .npz for train and "
                          "evaluate"))  # fmt: skip
    launch.add_options(command("launch", "run a command as N local processes joined as one run "
                               "(try multi-process training on one machine)"))  # fmt: skip
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
    _process_options(t.add_argument_group("several processes (hosts) as one run"))


def _process_options(g) -> None:
    """How a process joins the others of a multi-process run (runtime settings: a run may
    resume on another number of processes)."""
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address, reachable by all ($CNN_JAX_COORDINATOR)",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="how many processes the run has ($CNN_JAX_NUM_PROCESSES)",
    )
    g.add_argument(
        "--process-id",
        type=int,
        metavar="I",
        help="this process's number, 0 to N-1 ($CNN_JAX_PROCESS_ID)",
    )
    g.add_argument(
        "--distributed",
        choices=["auto"],
        help="auto: join as jax.distributed detects (SLURM, Open MPI, TPU pods)",
    )
    g.add_argument(
        "--join-timeout",
        type=int,
        default=300,
        metavar="S",
        help="seconds to wait for every process to join",
    )
    g.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                   help="seconds after which a silent process counts as lost")  # fmt: skip


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
            _tta_option(p)
        return p

    e = reads_checkpoint("evaluate", "loss and accuracy (overall and per class) of a checkpoint")
    e.add_argument("data", nargs="?", help="data folder or packed .npz; none: the run's test split")
    e.add_argument("--layout", choices=config_lib.LAYOUTS, default="auto", help="folder layout")
    e.add_argument("--cache-dir", help="decoded-image cache; none: $XDG_CACHE_HOME/cnn-jax")
    e.add_argument("--average-with", action="append", default=[], metavar="RUN",
                   help="another run (any image size and pixel scaling) whose probabilities "
                   "are averaged with the checkpoint's, a committee; repeat it for more. "
                   "Without DATA, the runs must share one test split; for runs at other "
                   "image sizes, DATA must be a folder, not a pack")  # fmt: skip
    pr = reads_checkpoint("predict", "classify image files with a checkpoint")
    pr.add_argument("images", nargs="+", help="image files (any format OpenCV or Pillow reads)")
    pr.add_argument("--top-k", type=int, default=3, help="how many classes to list per image")
    pr.add_argument("--average-with", action="append", default=[], metavar="RUN",
                    help="another run (any image size and pixel scaling) whose probabilities "
                    "are averaged with the checkpoint's, a committee; repeat it for "
                    "more")  # fmt: skip
    reads_checkpoint("info", "what a checkpoint holds, with a digest of its parameters", False)


def _tta_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", type=int, default=1, metavar="N",
                   help="test-time augmentation: average N views of each image, the image "
                   "and N-1 slightly turned, scaled and shifted copies (1: the image "
                   "alone)")  # fmt: skip


def _report_options(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("run_dir", metavar="RUN", help="a finished run's folder")
    rp.add_argument("data", nargs="?", help="data folder or .npz to test on; none: the test split")
    rp.add_argument("--out", help="the .html file to write; none: RUN/report.html")
    rp.add_argument("--force", action="store_true",
                    help="replace an existing --out that is not an earlier report")  # fmt: skip
    rp.add_argument("--compare", nargs="+", default=[], metavar="RUN2",
                    help="other runs whose curves share the axes")  # fmt: skip
    rp.add_argument("--layout", choices=config_lib.LAYOUTS, default="auto", help="folder layout")
    rp.add_argument("--cache-dir", help="decoded-image cache; none: $XDG_CACHE_HOME/cnn-jax")
    rp.add_argument("--platform", choices=backend.PLATFORMS, help="where to run; none: JAX's")
    _tta_option(rp)


def _export_options(ex: argparse.ArgumentParser) -> None:
    from cnn_jax.export.formats import FORMATS, QUANTIZE

    ex.add_argument("checkpoint", help="a run folder (its best checkpoint) or a step's folder")
    ex.add_argument("out", help="the file to write (.jax, .tflite or .onnx), and OUT.json beside")
    ex.add_argument("--format", choices=FORMATS, help="none: from OUT's suffix")
    ex.add_argument("--quantize", choices=sorted({q for qs in QUANTIZE.values() for q in qs}),
                    help="smaller weights (tflite: float16 or int8; onnx: int8), calibrated "
                    "on training images")  # fmt: skip
    ex.add_argument("--batch", type=int, default=1, help="tflite and onnx: the static batch size")
    ex.add_argument("--data", help="check on this folder or .npz instead of the run's test split")
    ex.add_argument("--check-images", type=int, metavar="N",
                    help="check on a seeded sample of N images; none: all")  # fmt: skip
    ex.add_argument("--force", action="store_true", help="replace an existing OUT and OUT.json")
    ex.add_argument("--cache-dir", help="decoded-image cache; none: $XDG_CACHE_HOME/cnn-jax")
    ex.add_argument("--json", action="store_true", help="print the sidecar instead of a summary")


def _pack_options(pk: argparse.ArgumentParser) -> None:
    pk.add_argument("data", help="data folder (CS50 or official GTSRB layout)")
    pk.add_argument("out", help="the .npz file to write")
    pk.add_argument("--force", action="store_true", help="replace an existing OUT")
    pk.add_argument("--layout", choices=config_lib.LAYOUTS, default="auto", help="folder layout")
    pk.add_argument("--image-size", type=int, default=Config().image_size, help="resize to N x N")
    pk.add_argument("--decoder", choices=config_lib.DECODERS, default=Config().decoder,
                    help="opencv: the tutorial's pixels; pillow: smoothing")  # fmt: skip


def given_settings(args) -> dict:
    """The Config settings a user gave on the command line (the strengths as one dict)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if f.name in args}
    prefix = config_lib.STRENGTH_PREFIX
    strengths = {k.removeprefix(prefix): v for k, v in vars(args).items() if k.startswith(prefix)}
    return {**given, "strengths": strengths} if strengths else given
