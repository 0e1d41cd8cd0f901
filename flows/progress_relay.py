"""Live progress from Dask workers: their stages' reports travel to the flow's process, where the bars are.

A Dask worker is another process (often another machine) with no display: without this, the embed bar of a
`--runner dask` run would sit at zero for the whole stage, and the score and write bars would not move. A task
running on a Dask worker sends its progress reports (pipeline/progress.py) as Dask events under `TOPIC`
(`Worker.log_event`, through the scheduler), and the flow's process, subscribed to that topic, makes each report
again where the sink and the embed stage's pair plan are (`progress.replay`). Batch reports are summed and sent at
most every `FLUSH_S` seconds, so a crawl's millions of pairs cost a few messages a second per worker; a shard's
`finish` goes at once, after what was summed before it. The display only: a lost message costs a bar its
accuracy, never the run its results (the stage lines come from the tasks' results).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Iterator

from bicro_clean.pipeline import progress

logger = logging.getLogger(__name__)
TOPIC = "bicro-clean-progress"
FLUSH_S = 0.5


def _dask_worker() -> Any | None:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):  # not inside a Dask worker's task
        return None


class _Relay:
    """One per worker process: sums batch reports, sends them and every `finish` as events under TOPIC."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], list[int]] = {}  # (stage, 0) -> [advance, total, items]
        self._last = time.monotonic()

    def __call__(self, message: tuple[str, tuple[Any, ...]]) -> None:
        name, args = message
        with self._lock:
            if name == "report":
                stage, advance, total, items = args
                sums = self._pending.setdefault((stage, 0), [0, 0, 0])
                sums[0], sums[1], sums[2] = sums[0] + advance, sums[1] + total, sums[2] + items
                if time.monotonic() - self._last < FLUSH_S:
                    return
                self._flush()
                return
            self._flush()
            self._send(name, list(args))

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for (stage, _), (advance, total, items) in pending.items():
            self._send("report", [stage, advance, total, items])
        self._last = time.monotonic()

    def _send(self, name: str, args: list[Any]) -> None:
        try:
            self.worker.log_event(TOPIC, [name, args])
        except Exception as error:  # a worker shutting down: the bar loses a step, the run nothing
            logger.debug("progress relay: %s", error)


@contextlib.contextmanager
def relayed() -> Iterator[None]:
    """Around a task's work: on a Dask worker (no display of its own), relay its progress to the flow's process.
    The relay stays installed for the worker's later tasks (a worker may run several at once on its threads);
    what it summed is sent when the task ends."""
    worker, relay = _dask_worker(), progress.current_relay()
    if worker is None or (progress.active() and not isinstance(relay, _Relay)):
        yield  # threads of the flow's own process report to its sink directly
        return
    if not isinstance(relay, _Relay):
        relay = _Relay(worker)
        progress.install_relay(relay)
    try:
        yield
    finally:
        relay.flush()


def _replay(event: Any) -> None:
    """A worker's report, made in this process. `event`: (scheduler time, [name, args])."""
    try:
        name, args = event[1]
        progress.replay((str(name), tuple(args)))
    except Exception as error:  # a malformed message must not break the client's event loop
        logger.debug("progress relay: dropped %r (%s)", event, error)


def subscribe(client: Any) -> None:
    """In the flow's process: make the workers' reports here (a no-op without a Dask client)."""
    if client is not None:
        client.subscribe_topic(TOPIC, _replay)


def unsubscribe(client: Any) -> None:
    if client is not None:
        try:
            client.unsubscribe_topic(TOPIC)
        except Exception as error:  # the cluster going away at the end of the run
            logger.debug("progress relay: %s", error)
