"""Ctrl-C (SIGINT) and SIGTERM end a run within seconds, with exit code 130 / 143 and no process left behind.

Why Python's defaults are not enough here:
- SIGINT raises KeyboardInterrupt in the main thread only. Under the Prefect runner the main thread waits on task
  futures while the stages go on in worker threads, and a terminal's Ctrl-C also reaches Prefect's temporary API
  server (same process group), which exits: the running tasks then retried against a dead server for minutes.
  Under `--runner none` the DataLoader's shutdown joins each decode worker for up to 5 s.
- SIGTERM's default action ends the process at once, and its children (the API server, Dask workers, decode
  workers) live on: a 227 MB uvicorn kept listening.

What happens instead: `signal.set_wakeup_fd` makes the C-level handler write the signal number to a pipe the moment
the signal arrives, whatever the main thread is doing and whichever Python handler is installed then (Prefect
swaps in its own SIGTERM handler while a flow runs). A watcher thread reads it, kills every descendant process and
ends this one with 128 + the signal number, as a shell reports a death by that signal. Every output is written
atomically (a temp file, then a rename), so stopping here is as safe as the SIGKILL of tests/e2e/test_resume.py:
the same command again resumes and its outputs are byte-identical to an uninterrupted run's
(tests/flows/test_signals.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Iterator

import psutil

logger = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REAP_SECONDS = 2.0  # how long to wait for killed children to be gone (SIGKILL: milliseconds, even on a busy machine)


def _no_op(signum: int, frame: object) -> None:
    """The Python-level handler: the wakeup pipe is written only for signals that have one; the work is done by
    the watcher thread, not here (this runs only when the main thread gets back to Python bytecode)."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Stop on SIGINT/SIGTERM as described above while the block runs; the previous handlers are back after it (a
    test process running the CLI in-process keeps its own Ctrl-C). Outside the main thread: a plain block (signal
    handlers can only be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C-level handler must never block
    previous = {signum: signal.signal(signum, _no_op) for signum in STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_fd,), name="bicro-stop-on-signal", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        os.close(write_fd)  # the watcher reads end-of-file and returns
        watcher.join(timeout=1.0)
        os.close(read_fd)


def _watch(read_fd: int) -> None:
    while True:
        data = os.read(read_fd, 1)
        if not data:
            return
        if data[0] in STOP_SIGNALS:
            stop(data[0])


def kill_descendants() -> int:
    """SIGKILL every process started from this one (children and theirs); returns how many there were."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        try:
            child.kill()
        except psutil.Error:  # already gone
            pass
    psutil.wait_procs(children, timeout=REAP_SECONDS)  # reaps our direct children: no zombie outlives us
    return len(children)


def _no_new_children() -> None:
    """Take the lock every decode-worker start holds (models.encoders.LOAD_LOCK) and keep it: a stage thread still
    running would otherwise fork the next group's decode workers between the kill below and this process's exit,
    and they would outlive it for the seconds their parent check takes. A model build may hold the lock; the stop
    waits at most REAP_SECONDS for it."""
    encoders = sys.modules.get("bicro_clean.models.encoders")  # not imported yet: no decode worker can exist
    if encoders is not None:
        encoders.LOAD_LOCK.acquire(timeout=REAP_SECONDS)


def stop(signum: int) -> None:
    """Say why in one line, kill the descendants, exit with 128 + signum (never returns)."""
    name = signal.Signals(signum).name
    line = f"\n{name}: stopped; run the same command again to resume (finished work is kept)\n"
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            line = "\x1b[?25h" + line  # the progress display hides the cursor; os._exit skips its cleanup
        os.write(2, line.encode())  # not sys.stderr: the main thread may hold its lock
    except (OSError, ValueError):
        pass
    _no_new_children()
    kill_descendants()
    os._exit(128 + signum)
