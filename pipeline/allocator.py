"""One glibc malloc arena for the process and its children.

Why: glibc gives every thread that allocates its own arena, and a non-main arena returns freed memory to the
kernel eagerly. torch's CPU kernels allocate and free large temporaries on every batch, so a model run from a
worker thread (Prefect's thread-pool runner, a Dask worker's executor thread) spends its time in page faults:
measured on 2 cores, EfficientNet-Lite0 over 2,000 Flickr8k images took 19.9 s of model time in a thread against
11.3 s in the main thread (18 s of system time), and 10.3 s in a thread with one arena (docs/benchmarks.md).

`use_one_malloc_arena()` must run before the process starts threads that allocate: glibc fixes the arena limit
the first time a second thread needs one. The environment variable covers processes started afterwards
(Dask's worker processes, the Prefect API server), which read it when their own malloc initialises. On other C
libraries (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc malloc.h


def use_one_malloc_arena() -> bool:
    """Limit this process (and, through MALLOC_ARENA_MAX, its future children) to one malloc arena. Returns
    whether this process's limit was set; a value already in the environment is the user's and is kept."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    os.environ["MALLOC_ARENA_MAX"] = "1"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # not glibc: no mallopt, nothing to tune
        logger.debug("mallopt unavailable (%s): malloc arenas left as they are", name)
        return False
