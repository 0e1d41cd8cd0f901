"""What every lab figure is stamped with and measured by: the machine's description and peak resident memory.

One `machine_info` (every benchmark's JSON `machine`), one peak-RSS reading (`peak_rss_mib`: the kernel's
VmHWM high-water mark of one process) and `ChildPeaks`, which reads the same VmHWM of a process's own children
(the embed stage's decode workers) while they live. A measured point that runs in a child interpreter reads its
own `peak_rss_mib()` and reports it back in its JSON, so a figure never includes its parent's memory.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import sys
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo ("unknown" without one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_info() -> dict[str, Any]:
    """CPU, cores, threads the pipeline uses, library versions, load and GPU: enough to compare two runs' figures."""
    import torch

    from bicro_clean.pipeline.parquet_io import cpu_threads

    info: dict[str, Any] = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_threads": cpu_threads(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "load_avg_1m": round(os.getloadavg()[0], 2),
                            "cuda": torch.cuda.is_available()}
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:  # faiss-gpu images name it differently; the figure is still worth having
        info["faiss"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return info


def peak_rss_mib(pid: int | None = None) -> float:
    """Peak RSS in MiB of this process (or of `pid`, one of ours that is still alive): /proc's VmHWM.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child spawned by a parent
    holding 1 GB reports >= 1 GB whatever it does; VmHWM belongs to the process's own address space (a forked
    process's starts at its RSS at the fork, the pages it shares with its parent). Where there is no /proc
    (macOS), ru_maxrss of this process is the only figure there is (bytes on macOS, KiB on Linux).
    """
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        if pid is not None:
            raise
    if pid is not None:  # a zombie (exited, not yet reaped) has no memory left to report
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 2**20 if sys.platform == "darwin" else usage / 1024


class ChildPeaks:
    """The largest VmHWM of any child of this process while the `with` block runs (0.0 when none ran).

    A child's VmHWM is gone once it exits, so it is read every `period` seconds while it lives: what a decode
    worker grows in its last `period` is missed, which is why workers are read often (they peak while
    decoding, not while exiting).
    """

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="child-peaks", daemon=True)

    def __enter__(self) -> "ChildPeaks":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # children still alive at the end

    def _sample(self) -> None:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                self.peak_mib = max(self.peak_mib, peak_rss_mib(child.pid))
            except OSError:  # exited between listing and reading
                continue

    def _watch(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()
