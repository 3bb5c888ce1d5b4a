"""`python -m cnn_jax` and the `cnn-jax` script: the signal handlers go in first, before the
command's imports take their half-second, so that a signal that early is not Python's default
(a traceback for Ctrl-C) but one line and exit code 128 + the signal."""

import sys

from cnn_jax import signals


def run() -> int:
    signals.install()
    try:
        from cnn_jax.cli import main

        signals.check()  # one that an import swallowed
    except KeyboardInterrupt as e:
        print(f"cnn-jax: interrupted ({signals.name(e)})", file=sys.stderr)
        return signals.exit_code(e)
    return main()


if __name__ == "__main__":
    sys.exit(run())
