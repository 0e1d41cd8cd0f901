"""Prefect's temporary API server for an in-process run, started at the beginning of the run instead of after its
imports, and without importing the server into the run's own process.

Without a configured API URL, Prefect's first flow call starts a temporary API server (a `uvicorn` subprocess
serving `prefect.server.api.server:create_app`) and waits for it. That cost a fully cached rerun seconds twice
over (profiled with py-spy, docs/benchmarks.md): the run's process first imported the whole Prefect server
(2-4 s of CPU) only to launch that subprocess, and the server's boot (it imports the same modules, ~6 s) began
only once the run had imported torch and the stages, instead of beside them on the other core. Here the run
launches the same server itself, first thing, and points the flow at it with Prefect's `temporary_settings`
(what a user's PREFECT_API_URL does). `PREFECT__SERVER_EPHEMERAL=1` is what Prefect sets for its temporary
server: the server runs only the services an ephemeral server needs. With an API URL configured (env or
profile), nothing is started and the flow talks to that server, as before.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator, Optional

logger = logging.getLogger(__name__)
APP = "prefect.server.api.server:create_app"
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL: the server holds nothing that a kill can damage (SQLite is journaled)
_SERVER: dict[str, object] = {}  # "proc": the Popen, "api": its API URL


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _needs_temporary_server() -> bool:
    """No API URL in the environment or the active profile, and ephemeral servers allowed (else Prefect's own
    behaviour: that server, or its error about the missing URL)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


def _launch() -> None:
    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", APP, "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "error", "--lifespan", "on"], env=env)
    _SERVER.update(proc=proc, api=f"http://127.0.0.1:{port}/api")
    logger.debug("temporary Prefect API server starting on port %d (pid %d)", port, proc.pid)


def start_early() -> None:
    """Launch the temporary API server now, in the background (nothing when an API URL is configured, or twice)."""
    if _SERVER or not _needs_temporary_server():
        return
    _launch()
    atexit.register(stop)


class _ServerExited(RuntimeError):
    pass


def _wait_healthy(proc: subprocess.Popen, api: str) -> None:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _ServerExited(f"the temporary Prefect API server exited with code {proc.returncode} at start")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(0.1)
    raise RuntimeError("the temporary Prefect API server did not answer in "
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")


def _ready_api(attempts: int = 3) -> str:
    """The API URL once the server answers; a server that exits at start (its port taken between our probe and
    its bind) is launched again on another port."""
    for attempt in range(attempts):
        proc, api = _SERVER["proc"], _SERVER["api"]
        try:
            _wait_healthy(proc, api)  # type: ignore[arg-type]
            return str(api)
        except _ServerExited:
            if attempt == attempts - 1:
                raise
            logger.warning("temporary Prefect API server exited at start: launching it again")
            _launch()
    raise AssertionError("unreachable")


@contextlib.contextmanager
def api_for_flow() -> Iterator[None]:
    """The block's flow calls use the server `start_early` launched, once it answers (else Prefect's defaults)."""
    if "proc" not in _SERVER:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: _ready_api()}):
        yield


def stop() -> None:
    """Stop the temporary server (at exit; Ctrl-C and SIGTERM kill it through bicro_clean/stop_signals.py)."""
    proc = _SERVER.pop("proc", None)
    _SERVER.pop("api", None)
    if not isinstance(proc, subprocess.Popen) or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
