"""Ctrl-C and SIGTERM for the `cnn-jax` command: each signal is recorded before anything else
happens, so that none is ever lost.

The handlers raise at once (KeyboardInterrupt, or Terminated for SIGTERM), which unwinds
whatever is running. Python drops an exception raised inside a garbage-collection callback
(JAX registers one), and library code may swallow one; the record survives that, and `check()`
at the command's safe points raises it again. Training polls the record instead (cli's
_StopOnSignal), to save a checkpoint first.
"""

import contextlib
import gc
import os
import signal
import sys
import threading
from signal import Signals  # noqa: F401  (for callers naming a signal)

OURS = (signal.SIGINT, signal.SIGTERM)
RECEIVED: list[int] = []  # every signal the command received, in order
_installed = False
_at_once = False  # within `ending_at_once()`


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding like Ctrl-C."""

    signum = signal.SIGTERM


def _handle(signum, frame):
    RECEIVED.append(signum)
    if _at_once:
        os.write(2, f"cnn-jax: interrupted ({signal.Signals(signum).name})\n".encode())
        os._exit(128 + signum)
    if in_gc_callback(frame):  # Python would print the exception as "ignored" and drop it:
        return  # the next check() raises it instead
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def in_gc_callback(frame) -> bool:
    """Whether the interrupted code runs inside a garbage-collection callback (JAX has one)."""
    codes = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def install() -> dict:
    """Our handlers for SIGTERM, and SIGINT unless it is ignored (a background job); returns
    the previous ones for `restore`. Nested calls leave the first in place."""
    global _installed
    if _installed:
        return {}
    wanted = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        wanted.append(signal.SIGINT)
    RECEIVED.clear()
    previous = {s: signal.signal(s, _handle) for s in wanted}
    _installed = True
    return previous


@contextlib.contextmanager
def ending_at_once():
    """Within it, a signal ends the process there and then, with its one line. For the imports
    before a command has opened or written anything: an import can swallow the exception, and
    unwinding a half-done import of JAX took longer (0.6 s here) than the import had left."""
    global _at_once
    _at_once = True
    try:
        yield
    finally:
        _at_once = False


def exit_now(code: int) -> None:
    """Ends the process with `code` once its output is flushed, skipping the interpreter's
    teardown (0.3-0.5 s with JAX loaded): after a signal, when the command has closed
    everything of its own."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing to flush to
            stream.flush()
    os._exit(code)


def hold() -> None:
    """From here on a signal waits (`pending` tells of it): the command's outcome is known, and
    an exception raised while the command returns would replace its exit code by a traceback."""
    if _installed and threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, OURS)


def pending() -> int | None:
    """The first signal received, or held back since `hold`; None without one."""
    waiting = sorted(signal.sigpending() & set(OURS))
    return RECEIVED[0] if RECEIVED else (int(waiting[0]) if waiting else None)


def restore(previous: dict) -> None:
    """Puts back what `install` replaced, lets held signals through to it, and forgets the
    signals (the command is over). A nested call leaves the process's own handlers, and any
    held signal, for the outer one."""
    global _installed
    if not previous:
        return
    for s, handler in previous.items():
        signal.signal(s, handler)
    _installed = False
    RECEIVED.clear()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, OURS)


def check() -> None:
    """Raises the first signal received, if its exception was lost; no-op without one."""
    if RECEIVED:
        raise Terminated if RECEIVED[0] == signal.SIGTERM else KeyboardInterrupt


def exit_code(exc: BaseException) -> int:
    return 128 + getattr(exc, "signum", signal.SIGINT)


def name(exc: BaseException) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
