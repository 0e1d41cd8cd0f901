"""The `clean-shards` Prefect flow: `pipeline.run.run_stages` with every stage as a Prefect task.

Only orchestration lives here. The sequence of stages and its checks are `run_stages`' own; this module supplies
an executor that runs each stage function as a task (mapped over shards where the stage is per shard), so the
task runner (threads, Dask, Ray) decides where the work happens. Every stage skips work whose outputs already
record its cache key, so a killed run resumes by simply running again, and a task can run on any machine that
sees the output location. Task results are paths and small dicts.
"""

# No `from __future__ import annotations`: Prefect resolves the flow signature (CleanConfig) at run time.

import logging
from typing import Any, Callable, TypeVar

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import task_run

from bicro_clean.flows.runners import task_runner_for
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
    """`<task>-<shard_id>` in the UI: the shard (or the one-shard embed batch) is the first parameter."""
    first = task_run.parameters.get("shard") or task_run.parameters.get("shards") or ["?"]
    return f"{task_run.task_name}-{shard_id(first if isinstance(first, str) else first[0])}"


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


class PrefectTasks:
    """Executor for `run_stages`: per-shard stages mapped as one task per shard, the others as single tasks."""

    def shard_batches(self, shards: list[str]) -> list[list[str]]:
        return [[shard] for shard in shards]

    def map(self, stage: Callable[..., T], items: list[Any], *shared: Any) -> list[T]:
        return TASKS[stage].map(items, *[unmapped(value) for value in shared]).result()

    def call(self, stage: Callable[..., T], *args: Any) -> T:
        return TASKS[stage](*args)


def _publish_artifacts(summary: dict[str, Any], shard_rows: list[dict[str, Any]]) -> None:
    counts = {k: summary[k] for k in ("in", "kept", "dropped", "errors")}
    reasons = "\n".join(f"| {reason} | {n} |" for reason, n in summary["by_reason"].items())
    create_markdown_artifact(
        key="clean-shards-summary",
        markdown=(f"# bicro-clean run\n\nOutput: `{summary['output']}`\n\n"
                  f"| in | kept | dropped | errors |\n|---|---|---|---|\n"
                  f"| {counts['in']} | {counts['kept']} | {counts['dropped']} | {counts['errors']} |\n\n"
                  f"| reason | rows |\n|---|---|\n{reasons}\n\nReport: `{summary.get('report')}`\n"),
        description="bicro-clean summary",
    )
    create_table_artifact(key="clean-shards-per-shard", table=shard_rows, description="per-shard counts")


def _shard_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"shard": r["shard_id"], **{k: r["counts"][k] for k in ("in", "kept", "dropped", "errors")},
             "cached": r["cached"]} for r in results]


@flow(name="clean-shards", log_prints=True, validate_parameters=True)
def clean_shards(config: CleanConfig) -> dict[str, Any]:
    """embed (mapped) -> fit -> score (mapped) -> run-wide values -> write (mapped) -> finalize -> report."""
    summary, written = run_stages(config, PrefectTasks())
    _publish_artifacts(summary, _shard_rows(written))
    return summary


def run_flow(config: CleanConfig) -> dict[str, Any]:
    """Run the flow in this process (Prefect's ephemeral API, no server) on the configured task runner."""
    return clean_shards.with_options(task_runner=task_runner_for(config.runner))(config=config)
