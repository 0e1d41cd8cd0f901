"""Task runners: local threads/processes, Dask (prefect-dask; dask-cuda's LocalCUDACluster for one worker per GPU)
or Ray (prefect-ray). No home-made scheduler."""

from __future__ import annotations

import logging
from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from bicro_clean.pipeline.config import RunnerConfig

logger = logging.getLogger(__name__)


def _cuda_cluster_runner(config: RunnerConfig) -> Any:
    """One Dask worker process per visible GPU (dask-cuda sets CUDA_VISIBLE_DEVICES per worker, so each worker's
    `cuda` is its own GPU); each worker builds its encoder and model itself (shared_encoder / shared_model)."""
    from prefect_dask import DaskTaskRunner

    try:
        import dask_cuda  # noqa: F401  (optional extra; resolved again by name when the cluster starts)
    except ImportError as error:
        raise RuntimeError("runner.cuda_cluster needs the extra: pip install 'bicro-clean[gpu]'") from error
    return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs={"threads_per_worker": 1})


def _dask_runner(config: RunnerConfig) -> Any:
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    if config.cuda_cluster:
        return _cuda_cluster_runner(config)
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


def worker_count(config: RunnerConfig, task_runner: Any = None) -> int:
    """How many tasks run at once: the workers of the Dask cluster `task_runner` is connected to (a LocalCluster,
    a LocalCUDACluster's one per GPU, or a remote scheduler's), else `runner.workers`."""
    client = getattr(task_runner, "client", None) if config.kind == "dask" else None
    if client is not None:
        workers = len(client.nthreads())  # every worker (scheduler_info() lists only the first few)
        if workers:
            return workers
        logger.warning("dask cluster has no workers yet: planning for runner.workers=%d", config.workers)
    return config.workers
