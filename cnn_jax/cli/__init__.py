"""The `cnn-jax` command: parses arguments, calls one library function per command, prints.

The package holds the options (options.py), `train` (train.py) and the other commands
(commands.py); this module runs one and turns its outcome into an exit code."""

import os
import sys
import threading
import traceback

from cnn_jax import signals
from cnn_jax.cli import commands, launch, options, train
from cnn_jax.errors import UserError

COMMANDS = {
    "train": train.command,
    "evaluate": commands.evaluate,
    "predict": commands.predict,
    "info": commands.info,
    "pack": commands.pack,
    "export": commands.export,
    "report": commands.report,
    "launch": launch.command,
}


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
        args = options.parser().parse_args(argv)
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
    run = COMMANDS.get(args.command) or args.run  # a plugin's command brings its own
    try:
        code = run(args)
        signals.hold()  # the outcome is known: a signal now must not turn it into a traceback
        return code
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
    except RuntimeError as e:
        # Path.resolve's word for a symlink loop before Python 3.13 (an OSError from then on)
        if not str(e).startswith("Symlink loop from "):
            return _bug(args.command)
        print(f"cnn-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        return _bug(args.command)
    except KeyboardInterrupt as e:
        print(f"cnn-jax {args.command}: interrupted ({signals.name(e)})", file=sys.stderr)
        return signals.exit_code(e)
