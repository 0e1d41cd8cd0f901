"""What a Dask cluster tells the flow about its tasks, and what the flow tells the cluster's workers at the end.

Lost workers: when a worker process dies (killed, out of memory, its machine gone), the scheduler removes it and
runs the tasks it was processing again elsewhere; Prefect's task run completes as if nothing happened. The
scheduler records each removal as a `remove-worker` event (topic "all") listing the keys the worker was running
or held the results of. `lost_workers` matches those keys to the flow's own futures, so the run can say which
worker was lost and which group of shards ran again.

Prefect's services on the workers: every task a Dask worker runs queues its state events and logs in that worker
process, for Prefect's EventsWorker and APILogWorker to send to the run's API server in the background. A worker
started by someone else (`dask worker`) outlives the run; the temporary API server of a CLI run does not. What
was still queued was then dropped with `EventsWorker failed ...` / `Unable to connect ...` errors in the worker's
log, and the service kept the dead server's address for the next run. `flush_prefect_services` drains both
services on every worker before the flow returns: the run's history is complete, and the next task a worker runs
starts fresh services against that run's server.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable

logger = logging.getLogger(__name__)
FLUSH_TIMEOUT_S = 10.0  # per worker and service; only items already queued are waited for


def dask_client(task_runner: Any) -> Any | None:
    """The distributed Client of a started DaskTaskRunner, else None (threads, Ray, no runner)."""
    client = getattr(task_runner, "client", None) if task_runner is not None else None
    return client if client is not None and hasattr(client, "get_events") else None


def worker_names(client: Any) -> dict[str, dict[str, Any]]:
    """address -> {"worker": address, "name": its name, "host": its host} for every worker now."""
    try:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
    except Exception as error:  # the scheduler going away is reported by the tasks themselves
        logger.debug("no worker list from the scheduler: %s", error)
        return {}
    return {address: {"worker": address, "name": str(info.get("name", address)), "host": info.get("host")}
            for address, info in workers.items()}


def lost_workers(client: Any, keys: dict[Hashable, int],
                 known: dict[str, dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """For the futures whose Dask keys are `keys` (key -> position), the workers removed while running them or
    while holding their results: position -> [worker record] (`known` names the workers by address)."""
    found: dict[int, list[dict[str, Any]]] = {}
    try:
        events = client.get_events("all")
    except Exception as error:
        logger.warning("could not read the scheduler's events (lost workers are not reported): %s", error)
        return found
    for _, event in events:
        if not isinstance(event, dict) or event.get("action") != "remove-worker":
            continue
        touched = set(event.get("processing-tasks", ())) | set(event.get("lost-computed-tasks", ()))
        address = str(event.get("worker"))
        for key in touched & keys.keys():
            found.setdefault(keys[key], []).append(dict(known.get(address, {"worker": address, "name": address})))
    return found


async def _drain_prefect_services() -> None:
    """On a worker, in its event loop (where `drain_all` returns an awaitable): send what Prefect's event and log
    services still hold, then stop them (see the module doc)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        await service.drain_all(timeout=FLUSH_TIMEOUT_S, at_exit=False)


def flush_prefect_services(client: Any) -> None:
    """Drain Prefect's services on every worker of `client`'s cluster, before the run's API server goes."""
    try:
        client.run(_drain_prefect_services, on_error="ignore")
    except Exception as error:  # a worker gone at this point has nothing left to send
        logger.debug("draining Prefect's services on the workers: %s", error)
