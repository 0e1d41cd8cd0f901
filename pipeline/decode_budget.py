"""A wall-clock bound on decoding one image.

Pixel and aspect-ratio bounds cap how much an image can be, not how long its decode takes: a JPEG with thousands
of progressive scans, or a PNG of tiny IDAT chunks, keeps a decoder busy for minutes within the pixel bound. In
the main thread of a process (the decode workers, `--runner none` with no workers) an interval timer interrupts the
decode when it overruns; in any other thread (signals reach only the main thread) the decode runs to its end and
is rejected afterwards if it overran, so the reason code is the same either way. The bound is generous by default
(`reader.max_decode_seconds`): a machine-dependent limit only for pathological inputs, never for photographs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Iterator

logger = logging.getLogger(__name__)


class DecodeTimeout(Exception):
    """The decode took longer than the bound."""


def _interrupt(signum: int, frame: object) -> None:
    raise DecodeTimeout()


@contextlib.contextmanager
def decode_time_bound(seconds: float) -> Iterator[None]:
    """Raise DecodeTimeout from the block once it has run `seconds` (0 = no bound)."""
    if seconds <= 0:
        yield
        return
    started = time.perf_counter()
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        if time.perf_counter() - started > seconds:
            raise DecodeTimeout()
        return
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
