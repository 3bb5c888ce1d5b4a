"""`python -m cnn_jax` and the `cnn-jax` script: the signal handlers go in first, before the
command's imports take their half-second, so that a signal that early is not Python's default
(a traceback for Ctrl-C) but one line and exit code 128 + the signal, at once; and they stay
until the process has ended (it skips the interpreter's teardown)."""

import sys

from cnn_jax import backend, signals
from cnn_jax.errors import UserError


def run() -> int:
    signals.install()
    try:
        backend.keep_freed_memory()  # before any thread starts: each keeps the heap it first used
    except UserError as e:  # its switch in the environment is neither on nor off
        print(f"cnn-jax: error: {e}", file=sys.stderr)
        signals.exit_now(2)
    with signals.ending_at_once():
        from cnn_jax.cli import main
    code = main()  # which holds back any signal from the command's end on (signals.hold)
    late = signals.pending()
    if late and code == 0:  # after the command's last check, or one that Python dropped
        print(f"cnn-jax: interrupted ({signals.Signals(late).name})", file=sys.stderr)
        code = 128 + late
    # The command has closed what it opened; Python's teardown would take 0.3-0.5 s with JAX
    # loaded, and it puts the default handlers back first.
    signals.exit_now(code)


if __name__ == "__main__":
    sys.exit(run())
