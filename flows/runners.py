"""Task runners: local threads/processes, Dask (prefect-dask) or Ray (prefect-ray). No home-made scheduler."""

from __future__ import annotations

import logging
from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from bicro_clean.pipeline.config import RunnerConfig

logger = logging.getLogger(__name__)


def _dask_runner(config: RunnerConfig) -> Any:
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    # One task at a time per worker process: the stages set their own torch/faiss thread counts (fixed, so
    # results do not depend on where a task runs), and two tasks of one process would share those pools.
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": config.workers, "threads_per_worker": 1, "processes": True})


def _ray_runner(config: RunnerConfig) -> Any:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as error:  # optional extra
        raise RuntimeError("runner 'ray' needs the extra: pip install 'bicro-clean[ray]'") from error
    return RayTaskRunner(address=config.ray_address) if config.ray_address else RayTaskRunner()


def task_runner_for(config: RunnerConfig) -> Any:
    """The Prefect task runner the configuration asks for."""
    if config.kind == "dask":
        return _dask_runner(config)
    if config.kind == "ray":
        return _ray_runner(config)
    if config.processes:
        return ProcessPoolTaskRunner(max_workers=config.workers)
    return ThreadPoolTaskRunner(max_workers=config.workers)

