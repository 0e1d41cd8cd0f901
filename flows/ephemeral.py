"""Prefect's temporary API server for an in-process run, started before the heavy imports instead of after them.

Without a PREFECT_API_URL, the first flow call starts a temporary API server (a `uvicorn` subprocess) and waits
for it to answer. That happens only once the flow module has imported torch, the encoders and the stages, so
the server's own boot (seconds: it imports the whole Prefect server and opens its database) followed our imports
instead of running beside them on the other core. `start_early()` starts Prefect's own server object
(`SubprocessASGIServer`, the one the flow call looks up, so the flow finds it running) from a thread while the
caller goes on importing; `wait_ready()` joins that thread before the flow starts. Measured figures:
docs/benchmarks.md (cached rerun through Prefect).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

logger = logging.getLogger(__name__)
_STARTER: dict[str, Any] = {}  # "thread": the starting thread, "error": what it raised, "server": the server


def _needs_temporary_server() -> bool:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


def _start(server: Any) -> None:
    try:
        server.start()
    except BaseException as error:  # noqa: BLE001 - re-raised by wait_ready in the caller's thread
        _STARTER["error"] = error


def start_early() -> None:
    """Start the temporary API server in the background (a no-op with a configured PREFECT_API_URL, or twice)."""
    if "thread" in _STARTER or not _needs_temporary_server():
        return
    # Imported here, in the caller's thread: two threads importing the same large package at once is where
    # Python's per-module import locks can hand one of them a half-initialised module.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # Prefect keeps one per port; port None is the one a flow call uses
    thread = threading.Thread(target=_start, args=(server,), name="bicro-prefect-api-start", daemon=True)
    _STARTER.update(thread=thread, server=server)
    thread.start()


def wait_ready() -> None:
    """Until the server `start_early` started answers (its start-up error, if any, raised here)."""
    thread: Optional[threading.Thread] = _STARTER.get("thread")
    if thread is None:
        return
    thread.join()
    error = _STARTER.pop("error", None)
    if error is not None:
        raise error

