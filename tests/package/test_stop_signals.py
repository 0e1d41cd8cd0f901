"""bicro_clean.stop_signals on its own (no pipeline): a process in the block ends with 128 + signal within a second,
its child processes killed, even while the main thread is busy; after the block the old handlers are back.
Whole runs stopped by signals: tests/flows/test_signals.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from bicro_clean.stop_signals import STOP_SIGNALS, stop_on_signals

# The main thread is inside a long C call (time.sleep), where a Python-level handler would not run until it
# returns: the watcher thread must act anyway. The child is a `sleep` that must not outlive the process.
SCRIPT = textwrap.dedent("""
    import subprocess, sys, time
    from bicro_clean.stop_signals import stop_on_signals
    with stop_on_signals():
        child = subprocess.Popen(["sleep", "60"])
        print(child.pid, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_a_signal_ends_the_process_with_128_plus_it_and_kills_its_children(signum):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    child = psutil.Process(int(proc.stdout.readline()))
    sent = time.monotonic()
    proc.send_signal(signum)
    code = proc.wait(timeout=10)
    took = time.monotonic() - sent
    assert code == 128 + signum and took < 3.0, (code, took, proc.stderr.read())
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert f"{signal.Signals(signum).name}: stopped; run the same command again to resume" in proc.stderr.read()


def test_the_previous_handlers_are_back_after_the_block():
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    with stop_on_signals():
        assert all(signal.getsignal(signum) is not before[signum] for signum in STOP_SIGNALS)
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == before
    assert signal.set_wakeup_fd(-1) == -1  # no wakeup pipe left installed
