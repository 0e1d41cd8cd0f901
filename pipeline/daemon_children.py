"""Starting the embed stage's decode workers from a daemonic process (a Dask worker, a multiprocessing pool worker).

`multiprocessing` refuses to start a child from a process whose daemon flag is set ("daemonic processes are not
allowed to have children"), and the processes Dask runs tasks in have it set: every `LocalCluster` worker and
every worker a nanny starts (the default `dask worker`). The rule exists because a daemonic process is killed
when its parent exits, without its own exit handlers, so children it started could outlive it as orphans.

That concern does not hold for torch's DataLoader workers, the only children started through this module: each
one watches its parent (`torch.utils.data._utils.worker.ManagerWatchdog`: the parent pid is checked every time
it waits for work, at most `MP_STATUS_CHECK_INTERVAL` = 5 s apart) and exits when the parent is gone, and the
DataLoader shuts them down itself when its iterator ends or is dropped. So the flag is cleared for exactly as
long as the workers take to start, and restored at once. Dask's own switch for this
(`distributed.worker.daemon: false`) would have to be set in every worker's environment before it starts, which
a run cannot do for a cluster someone else started; this works for any process the stage lands in.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from typing import Iterator

_LOCK = threading.Lock()  # two threads of one process starting loaders must not restore each other's flag early


@contextlib.contextmanager
def children_allowed() -> Iterator[None]:
    """Inside the block this process may start child processes even if it is daemonic (see the module doc)."""
    process = multiprocessing.current_process()
    # `_config["daemon"]` is what Process.start() checks; the public `daemon` setter refuses a started process
    if not process._config.get("daemon"):  # type: ignore[attr-defined]
        yield
        return
    with _LOCK:
        process._config["daemon"] = False  # type: ignore[attr-defined]
        try:
            yield
        finally:
            process._config["daemon"] = True  # type: ignore[attr-defined]
