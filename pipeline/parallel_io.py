"""Parallel reads for the run-wide steps: one bounded thread pool, results in input order.

The run-wide steps (select's run-wide values, the fit sample, finalize, the report) read one or a few small
things from every shard's files. One after another that is a round trip per file: seconds on a local disk,
hours on an object store at 10^5 shards. Parquet decoding and fsspec reads release the GIL, so threads overlap
both the latency and most of the decoding.

`imap` keeps at most `window` results in flight, so a caller that streams over 10^5 files holds a bounded
number of them, never the whole run.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Enough threads to hide object-store latency (30-100 ms a request), few enough to stay polite to one host.
DEFAULT_THREADS = int(os.environ.get("BICRO_CLEAN_IO_THREADS", "16"))


def imap(fn: Callable[[T], R], items: Iterable[T], threads: int = DEFAULT_THREADS,
         window: int | None = None) -> Iterator[R]:
    """`map(fn, items)` on a thread pool, in input order, with at most `window` (default 2 x threads) calls
    submitted and not yet consumed. The first exception is raised when its result is reached."""
    threads = max(1, threads)
    window = max(threads, window or 2 * threads)
    if threads == 1:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bicro-io") as pool:
        try:
            for item in items:
                if len(pending) >= window:
                    yield pending.popleft().result()
                pending.append(pool.submit(fn, item))
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # an exception or an abandoned generator: start nothing more
                future.cancel()


def pmap(fn: Callable[[T], R], items: Iterable[T], threads: int = DEFAULT_THREADS) -> list[R]:
    """`list(map(fn, items))` on a thread pool: for small per-file results (counts, metadata, partials)."""
    return list(imap(fn, items, threads))
