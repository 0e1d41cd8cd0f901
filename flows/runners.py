"""Task runners: local threads/processes, Dask (prefect-dask; dask-cuda's LocalCUDACluster for one worker per GPU)
or Ray (prefect-ray). No home-made scheduler. Also where the model stages' tasks run: the GPU requests of Ray tasks,
and a warning when Dask workers of one host would share one GPU."""

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


# GPU placement. Ray shows a task only the GPUs it requested (CUDA_VISIBLE_DEVICES), so a model stage's task must
# request one or `cuda` fails there and `auto` silently runs on the CPU. Dask workers see what their process was
# started with: `dask cuda worker` gives each worker its own GPU first in CUDA_VISIBLE_DEVICES.


def ray_gpus_per_task(device: str, cluster_gpus: float) -> int:
    """GPUs a Ray task of a model stage (embed, fit, score) requests: 1 for cuda or cuda:N, 1 for auto on a
    cluster with GPUs, else 0 (cpu, mps, or auto on a CPU-only cluster, which then runs as it does here).
    DeviceUnavailableError (one line) where a request could never run: no GPU in the cluster (Ray would wait
    forever for one), or cuda:N with N > 0 (the task sees only its one GPU, as cuda:0)."""
    from bicro_clean.models.devices import DeviceUnavailableError

    if not device.startswith("cuda"):
        return 1 if device == "auto" and cluster_gpus > 0 else 0
    if cluster_gpus <= 0:
        raise DeviceUnavailableError(f"device {device} was asked for, but the Ray cluster has no GPU "
                                     "(ray.cluster_resources() lists none): start a GPU node or use device auto")
    if int(device.partition(":")[2] or 0) > 0:
        raise DeviceUnavailableError(f"device {device} was asked for, but a Ray task sees only the one GPU Ray "
                                     "gives it, as cuda:0: use device cuda")
    return 1


def ray_remote_options(config: RunnerConfig, device: str, task_runner: Any) -> dict[str, Any]:
    """prefect-ray's `remote_options` for the model stages' tasks on this run's Ray cluster ({} when none)."""
    if config.kind != "ray" or task_runner is None:
        return {}
    import ray  # initialised by the RayTaskRunner that runs this flow

    gpus = ray_gpus_per_task(device, float(ray.cluster_resources().get("GPU", 0)))
    logger.info("ray: model stages request %d GPU per task (device %s)", gpus, device)
    return {"num_gpus": gpus} if gpus else {}


def _gpu_of_worker() -> tuple[str, int, str]:
    """(host, GPUs this process sees, the first of them): runs in each Dask worker."""
    import os
    import socket

    import torch

    count = torch.cuda.device_count()  # a driver query: no CUDA context is created
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() if count else ""
    return socket.gethostname(), count, first


def shared_gpus(workers: dict[str, tuple[str, int, str]]) -> list[str]:
    """Workers (address -> `_gpu_of_worker`) that see several GPUs and share their `cuda` (their first one) with
    another worker of the same host: plain `dask worker --nworkers N` on a multi-GPU node, all on one GPU."""
    by_gpu: dict[tuple[str, str], list[str]] = {}
    for address, (host, count, first) in workers.items():
        if count > 1:
            by_gpu.setdefault((host, first), []).append(address)
    return sorted(address for group in by_gpu.values() if len(group) > 1 for address in group)


def warn_shared_gpus(client: Any, device: str) -> list[str]:
    """Log a warning naming `dask cuda worker` when Dask workers of one host would all run on one of its GPUs."""
    if client is None or device in ("cpu", "mps"):
        return []
    try:
        shared = shared_gpus(client.run(_gpu_of_worker))
    except Exception as error:  # a worker that cannot answer: placement is advice, never a reason to stop a run
        logger.info("dask: could not ask the workers which GPU they use: %s", error)
        return []
    if shared:
        logger.warning("dask workers %s share one GPU of a multi-GPU host (each uses its first visible GPU): start "
                       "one worker per GPU with `dask cuda worker tcp://SCHEDULER:8786`", ", ".join(shared))
    return shared
