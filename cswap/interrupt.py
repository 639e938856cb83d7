"""SIGINT and SIGTERM during a run become `RunInterrupted`, so the run stops like a failure.

Why: Python's default SIGTERM ends the process at once (no `finally`, nothing in log.txt, the
last decisions since the previous checkpoint lost) and SIGINT raises KeyboardInterrupt
anywhere. Raising our own exception from the handler runs every `finally` on the way out:
the analysis state is saved (`deferred`, so a second signal cannot cut that write short),
log.txt gets a line, the lock is released, and the CLI prints how to resume.
"""
from __future__ import annotations

import contextlib
import signal
import threading

from .errors import RunInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise(signum, _frame):
    raise RunInterrupted(signum)


@contextlib.contextmanager
def interruptible():
    """Within the block SIGINT and SIGTERM raise `RunInterrupted` (main thread only: Python
    delivers signals there; elsewhere this does nothing). Previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT and SIGTERM back while the block runs (a state write must finish); they
    are delivered when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
