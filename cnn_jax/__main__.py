"""`python -m cnn_jax` and the `cnn-jax` script: the signal handlers go in first, before the
command's imports take their half-second, so that a signal that early is not Python's default
(a traceback for Ctrl-C) but one line and exit code 128 + the signal, at once."""

import sys

from cnn_jax import signals


def run() -> int:
    signals.install()
    with signals.ending_at_once():
        from cnn_jax.cli import main
    code = main()  # from its return on, a signal ends the process at once (signals.restore)
    if signals.RECEIVED:  # the command closed what it had open: no need to wait for teardown
        if code == 0:  # a signal whose exception Python dropped, after the command's last check
            print(f"cnn-jax: interrupted ({signals.Signals(signals.RECEIVED[0]).name})",
                  file=sys.stderr)  # fmt: skip
            code = 128 + signals.RECEIVED[0]
        signals.exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(run())
