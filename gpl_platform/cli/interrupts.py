"""Ctrl-C and SIGTERM stop `gpl run`, wherever in the process they land.

Python runs a signal handler between two bytecodes of the main thread, and that can be inside a garbage
collector callback or a ``__del__``: the KeyboardInterrupt raised there is printed as "Exception ignored" and
dropped, and the run went on as if nothing happened. Here an interrupt dropped that way sends its signal
again, so it is raised at the next point that can take it.
"""

import os
import signal
import sys
import threading

REDELIVERY_DELAY_S = 0.05


class SignalInterrupt(KeyboardInterrupt):
    """A KeyboardInterrupt raised by :func:`install`'s handler for ``signum``."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupt(signum, frame):
    raise SignalInterrupt(signum)


def _redeliver_dropped_interrupt(unraisable) -> None:
    # A dropped interrupt is not an error to print: its signal is sent again and lands elsewhere. Sent from
    # another thread a moment later: sent from here, the handler would run (and be dropped) inside this hook.
    if isinstance(unraisable.exc_value, SignalInterrupt):
        resend = threading.Timer(REDELIVERY_DELAY_S, os.kill, (os.getpid(), unraisable.exc_value.signum))
        resend.daemon = True
        resend.start()
        return
    sys.__unraisablehook__(unraisable)


def install() -> None:
    """SIGINT and SIGTERM raise :class:`SignalInterrupt` (a KeyboardInterrupt: Dagster records the run it
    interrupts as failed) in the main thread; one dropped by a callback is delivered again."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupt)
    sys.unraisablehook = _redeliver_dropped_interrupt
