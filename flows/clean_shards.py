"""The `clean-shards` Prefect flow: `pipeline.run.run_stages` with every stage as a Prefect task.

Only orchestration lives here. The sequence of stages and its checks are `run_stages`' own; this module supplies
an executor that runs each stage function as a task (mapped over shards where the stage is per shard), so the
task runner (threads, Dask, Ray) decides where the work happens. The embed stage is mapped over one batch of
shards per worker, so each worker streams its shards through one loader (one encoder, one set of decode
workers). Every stage skips work whose outputs already record its cache key, so a killed run resumes by simply
running again, and a task can run on any machine that sees the output location. Task arguments and results are
paths, configs and small dicts: no model is pickled into a task, each worker process builds its own encoder and
BiCro model once (models.encoders.shared_encoder, pipeline.score.shared_model).
"""

# No `from __future__ import annotations`: Prefect resolves the flow signature (CleanConfig) at run time.

import logging
from typing import Any, Callable, TypeVar

from bicro_clean.pipeline.allocator import use_one_malloc_arena

use_one_malloc_arena()  # stages run in task-runner threads: see pipeline/allocator.py (a no-op after the CLI's)

from prefect import flow, task, unmapped
from prefect.context import FlowRunContext
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import task_run

from bicro_clean.flows.ephemeral import api_for_flow
from bicro_clean.flows.runners import task_runner_for, worker_count
from bicro_clean.pipeline import select
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.embed import embed_stage
from bicro_clean.pipeline.finalize import finalize_stage
from bicro_clean.pipeline.fit import fit_stage
from bicro_clean.pipeline.run import report_stage, run_stages
from bicro_clean.pipeline.score import score_stage
from bicro_clean.pipeline.shards import shard_id
from bicro_clean.pipeline.write import write_stage

logger = logging.getLogger(__name__)
T = TypeVar("T")
IO_RETRIES = dict(retries=2, retry_delay_seconds=5)  # transient IO (object stores, NFS hiccups)


def _per_shard_name() -> str:
    """`<task>-<shard_id>` in the UI (the shard is the first parameter); an embed batch is named by its first shard
    and how many follow: `embed-00004+3`."""
    first = task_run.parameters.get("shard") or task_run.parameters.get("shards") or ["?"]
    if isinstance(first, str):
        return f"{task_run.task_name}-{shard_id(first)}"
    more = f"+{len(first) - 1}" if len(first) > 1 else ""
    return f"{task_run.task_name}-{shard_id(first[0])}{more}"


# Each stage function once as a task, under the name the UI and logs show.
TASKS = {
    embed_stage: task(embed_stage, name="embed", task_run_name=_per_shard_name, **IO_RETRIES),
    fit_stage: task(fit_stage, name="fit"),
    score_stage: task(score_stage, name="score", task_run_name=_per_shard_name, **IO_RETRIES),
    select.run_wide_values: task(select.run_wide_values, name="run-wide-values"),
    write_stage: task(write_stage, name="write", task_run_name=_per_shard_name, **IO_RETRIES),
    finalize_stage: task(finalize_stage, name="finalize"),
    report_stage: task(report_stage, name="report"),
}


def split_even(shards: list[str], parts: int) -> list[list[str]]:
    """`shards` in at most `parts` contiguous batches whose sizes differ by at most one, order kept (the fit sample
    reads the embedding files in shard order)."""
    parts = max(1, min(parts, len(shards)))
    size, extra = divmod(len(shards), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [shards[bounds[i]:bounds[i + 1]] for i in range(parts)]


class PrefectTasks:
    """Executor for `run_stages`: embed as one task per worker streaming a batch of shards, score and write mapped
    as one task per shard, the others as single tasks."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def shard_batches(self, shards: list[str]) -> list[list[str]]:
        return split_even(shards, self.workers)

    def map(self, stage: Callable[..., T], items: list[Any], *shared: Any) -> list[T]:
        return TASKS[stage].map(items, *[unmapped(value) for value in shared]).result()

    def call(self, stage: Callable[..., T], *args: Any) -> T:
        return TASKS[stage](*args)


def _publish_artifacts(summary: dict[str, Any], shard_rows: list[dict[str, Any]]) -> None:
    counts = {k: summary[k] for k in ("in", "kept", "dropped", "errors")}
    reasons = "\n".join(f"| {reason} | {n} |" for reason, n in summary["by_reason"].items())
    stages = ", ".join(f"{stage} {seconds}" for stage, seconds in summary["stage_seconds"].items())
    create_markdown_artifact(
        key="clean-shards-summary",
        markdown=(f"# bicro-clean run\n\nOutput: `{summary['output']}`\n\n"
                  f"| in | kept | dropped | errors |\n|---|---|---|---|\n"
                  f"| {counts['in']} | {counts['kept']} | {counts['dropped']} | {counts['errors']} |\n\n"
                  f"| reason | rows |\n|---|---|\n{reasons}\n\n"
                  f"Stage seconds: {stages} (total {summary['total_seconds']})\n\nReport: `{summary.get('report')}`\n"),
        description="bicro-clean summary",
    )
    create_table_artifact(key="clean-shards-per-shard", table=shard_rows, description="per-shard counts")


def _shard_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"shard": r["shard_id"], **{k: r["counts"][k] for k in ("in", "kept", "dropped", "errors")},
             "cached": r["cached"]} for r in results]


@flow(name="clean-shards", log_prints=True, validate_parameters=True)
def clean_shards(config: CleanConfig) -> dict[str, Any]:
    """embed (mapped) -> fit -> score (mapped) -> run-wide values -> write (mapped) -> finalize -> report."""
    context = FlowRunContext.get()
    workers = worker_count(config.runner, context.task_runner if context else None)
    summary, written = run_stages(config, PrefectTasks(workers))
    _publish_artifacts(summary, _shard_rows(written))
    return summary


def run_flow(config: CleanConfig) -> dict[str, Any]:
    """Run the flow in this process on the configured task runner, against PREFECT_API_URL's server if one is
    configured, else Prefect's temporary API server (flows/ephemeral.py)."""
    with api_for_flow():  # the temporary API server the CLI launched first thing, if it did (flows/ephemeral.py)
        return clean_shards.with_options(task_runner=task_runner_for(config.runner))(config=config)
