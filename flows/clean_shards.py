"""The `clean-shards` Prefect flow: `pipeline.run.run_stages` with every stage as a Prefect task.

Only orchestration lives here. The sequence of stages and its checks are `run_stages`' own; this module supplies
an executor that runs each stage function as a task, so the task runner (threads, Dask, Ray) decides where the
work happens. The per-shard stages (embed, score, write) are mapped over groups of shards, several per worker
(pipeline/shard_groups.py): task runs grow with the workers, not the crawl, and a slow, lost or added worker
rebalances. Every stage skips work whose outputs already record its cache key, so a lost group redoes only its
unfinished shards, a killed run resumes by simply running again, and a task can run on any machine that sees the
output location. Task arguments and results are paths, configs and small records: no model is pickled into a
task, each worker process builds its own encoder and BiCro model once (models.encoders.shared_encoder,
pipeline.score.shared_model). Each group's result says whether it was retried; on Dask the scheduler's
remove-worker events name the workers lost while running a group (`PrefectTasks.map`). On Ray the model stages'
tasks (embed, fit, score) request a GPU where the run can use one (flows/runners.py), and the fit then runs as
a task, on a GPU node, instead of in the flow's process.
"""

# No `from __future__ import annotations`: Prefect resolves the flow signature (CleanConfig) at run time.

import contextlib
import logging
from typing import Any, Callable, TypeVar

from bicro_clean.pipeline.allocator import use_one_malloc_arena

use_one_malloc_arena()  # stages run in task-runner threads: see pipeline/allocator.py (a no-op after the CLI's)

from prefect import flow, task, unmapped
from prefect.context import FlowRunContext
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import task_run

from bicro_clean.flows import cluster_events, progress_relay
from bicro_clean.flows.ephemeral import api_for_flow
from bicro_clean.flows.failures import ONE_LINE_ERRORS, failed
from bicro_clean.flows.progress_relay import relayed
from bicro_clean.flows.runners import ray_remote_options, task_runner_for, warn_shared_gpus, worker_count
from bicro_clean.pipeline import progress, select
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.finalize import finalize_stage
from bicro_clean.pipeline.fit import fit_stage
from bicro_clean.pipeline.pack import pack_group, place_group, plan_stage
from bicro_clean.pipeline.run import report_scan, report_stage, run_stages
from bicro_clean.pipeline.shard_groups import GroupResult, embed_group, plan_groups, score_group, write_group
from bicro_clean.pipeline.shards import shard_id

logger = logging.getLogger(__name__)
T = TypeVar("T")
IO_RETRIES = dict(retries=2, retry_delay_seconds=5)  # transient IO (object stores, NFS hiccups)


def _group_name() -> str:
    """`<task>-<first shard id>+<more>` in the UI: `score-00004+37` is shard 00004 and the 37 after it."""
    shards = task_run.parameters.get("shards") or ["?"]
    more = f"+{len(shards) - 1}" if len(shards) > 1 else ""
    return f"{task_run.task_name}-{shard_id(shards[0])}{more}"


def _counted(result: GroupResult) -> GroupResult:
    """The group's result with Prefect's run count for its task (2 or more after a retry)."""
    result.attempt = int(task_run.run_count or 1)
    return result


# The per-shard stages' task functions: the group functions, each returning its attempt number too; on a Dask
# worker their progress reports travel to the flow's process (flows/progress_relay.py).
def embed(shards: list[str], config: CleanConfig) -> GroupResult:
    with relayed():
        return _counted(embed_group(shards, config))


def score(shards: list[str], config: CleanConfig, checkpoint_path: str) -> GroupResult:
    with relayed():
        return _counted(score_group(shards, config, checkpoint_path))


def write(shards: list[str], config: CleanConfig, run_wide: select.RunWide) -> GroupResult:
    with relayed():
        return _counted(write_group(shards, config, run_wide))


class _Recorded:
    """A progress sink that keeps what a stage reported, for the process that holds the display to replay."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, int, int, int]] = []

    def report(self, stage: str, advance: int, total: int, items: int) -> None:
        self.reports.append((stage, advance, total, items))

    def stage_done(self, stage: str, seconds: float, tally: Any = None) -> None:
        pass


def fit_elsewhere(config: CleanConfig, embedding_paths: list[str]) -> tuple[str, list[tuple[str, int, int, int]]]:
    """The fit as a task in another process (a Ray GPU worker, which runs one task at a time): the checkpoint path
    and the fit's progress reports (epochs, pairs), which the stage's line is made of."""
    recorded = _Recorded()
    previous = progress.install(recorded)
    try:
        return fit_stage(config, embedding_paths), recorded.reports
    finally:
        progress.install(previous)


# Each stage function once as a task, under the name the UI and logs show.
TASKS = {
    embed_group: task(embed, name="embed", task_run_name=_group_name, **IO_RETRIES),
    fit_stage: task(fit_stage, name="fit"),
    score_group: task(score, name="score", task_run_name=_group_name, **IO_RETRIES),
    select.run_wide_values: task(select.run_wide_values, name="run-wide-values"),
    write_group: task(write, name="write", task_run_name=_group_name, **IO_RETRIES),
    plan_stage: task(plan_stage, name="pack-plan"),  # pack: the run's cleaned shards (pipeline/pack.py)
    pack_group: task(pack_group, name="pack", **IO_RETRIES),
    place_group: task(place_group, name="place", **IO_RETRIES),
    finalize_stage: task(finalize_stage, name="finalize"),
    report_scan: task(report_scan, name="report-scan", **IO_RETRIES),
    report_stage: task(report_stage, name="report"),
}
MODEL_STAGES = (embed_group, fit_stage, score_group)  # the stages that run the encoder or the BiCro model
FIT_ELSEWHERE = task(fit_elsewhere, name="fit")


class PrefectTasks:
    """Executor for `run_stages`: the per-shard stages mapped as one task per group of shards (several groups per
    worker), the others as single tasks in the flow's process. On Dask, `map` also asks the scheduler which
    workers were lost while running a group and records them in that group's result."""

    def __init__(self, workers: int = 1, task_runner: Any = None, placement: dict[str, Any] | None = None) -> None:
        self.workers = workers
        self.placement = placement or {}  # Ray resources of a model stage's task: {"num_gpus": 1} on GPU clusters
        self.client = cluster_events.dask_client(task_runner)
        self.known: dict[str, dict[str, Any]] = {}  # every worker seen, by address (a lost one is gone from the list)
        progress_relay.subscribe(self.client)  # the workers' progress reports, made here where the bars are

    def shard_batches(self, shards: list[str]) -> list[list[str]]:
        return plan_groups(shards, self.workers)

    def map(self, stage: Callable[..., T], items: list[Any], *shared: Any) -> list[T]:
        if self.client is not None:
            self.known.update(cluster_events.worker_names(self.client))
        with self._placed(stage):
            futures = TASKS[stage].map(items, *[unmapped(value) for value in shared])
        results = futures.result()
        if self.client is not None:
            self._note_lost_workers(futures, results)
        return results

    def call(self, stage: Callable[..., T], *args: Any) -> T:
        if stage is fit_stage and self.placement:  # fit on a Ray GPU worker, not in the flow's process
            with self._placed(stage):
                path, reports = FIT_ELSEWHERE.submit(*args).result()
            for report in reports:  # the fit's line (pairs, epochs) where the display is
                progress.report(*report)
            return path  # type: ignore[return-value]
        return TASKS[stage](*args)

    def _placed(self, stage: Callable[..., Any]) -> Any:
        """Ray's remote options (GPU requests) around the submission of a model stage's tasks."""
        if stage not in MODEL_STAGES or not self.placement:
            return contextlib.nullcontext()
        from prefect_ray.context import remote_options

        return remote_options(**self.placement)

    def _note_lost_workers(self, futures: Any, results: list[Any]) -> None:
        keys = {future.wrapped_future.key: i for i, future in enumerate(futures)
                if getattr(future, "wrapped_future", None) is not None}
        for position, workers in cluster_events.lost_workers(self.client, keys, self.known).items():
            if isinstance(results[position], GroupResult):
                results[position].lost_workers.extend(workers)
                logger.warning("%s: worker %s was lost while running shards %s; they ran again elsewhere",
                               results[position].stage, workers[0]["name"],
                               ", ".join(shard_id(s) for s in results[position].shards))

    def finish(self) -> None:
        """At the end of the flow: the cluster's workers send what Prefect still holds for this run."""
        if self.client is not None:
            progress_relay.unsubscribe(self.client)
            cluster_events.flush_prefect_services(self.client)


def _publish_artifacts(summary: dict[str, Any]) -> None:
    """A Markdown summary, and the per-shard record as a file: a link to manifest.json (every input shard with its
    reading report and outputs, each with its row count and hash), not a table of one row per shard sent
    through the API (a million-row artifact at crawl scale)."""
    counts = {k: summary[k] for k in ("in", "kept", "dropped", "errors")}
    reasons = "\n".join(f"| {reason} | {n} |" for reason, n in summary["by_reason"].items())
    stages = ", ".join(f"{stage} {seconds}" for stage, seconds in summary["stage_seconds"].items())
    lost = "".join(f"\n\nLost worker `{w['name']}` in {w['stage']}: shards {', '.join(w['shards'])} ran again."
                   for w in summary.get("lost_workers", []))
    create_markdown_artifact(
        key="clean-shards-summary",
        markdown=(f"# bicro-clean run\n\nOutput: `{summary['output']}`\n\n"
                  f"| in | kept | dropped | errors |\n|---|---|---|---|\n"
                  f"| {counts['in']} | {counts['kept']} | {counts['dropped']} | {counts['errors']} |\n\n"
                  f"| reason | rows |\n|---|---|\n{reasons}\n\n"
                  f"Shards: {summary['shards']} ({summary['cached_shards']} written by an earlier run){lost}\n\n"
                  f"Stage seconds: {stages} (total {summary['total_seconds']})\n\nReport: `{summary.get('report')}`\n"),
        description="bicro-clean summary",
    )
    create_link_artifact(key="clean-shards-per-shard", link=str(summary["manifest"]), link_text="manifest.json",
                         description="per-shard record: inputs, outputs with row counts and hashes")


@flow(name="clean-shards", log_prints=True, validate_parameters=True)
def clean_shards(config: CleanConfig) -> dict[str, Any]:
    """embed (mapped) -> fit -> score (mapped) -> run-wide values -> write (mapped) -> pack (mapped) -> finalize ->
    report."""
    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    executor = PrefectTasks(worker_count(config.runner, runner), runner,
                            ray_remote_options(config.runner, config.embed.device, runner))
    warn_shared_gpus(executor.client, config.embed.device)
    try:
        summary, _ = run_stages(config, executor)
    except ONE_LINE_ERRORS as error:  # Failed with the CLI's one line as its message, not a traceback
        return failed(error)  # type: ignore[return-value]  (flows/failures.py)
    finally:
        executor.finish()
    _publish_artifacts(summary)
    return summary


def run_flow(config: CleanConfig) -> dict[str, Any]:
    """Run the flow in this process on the configured task runner, against PREFECT_API_URL's server if one is
    configured, else Prefect's temporary API server (flows/ephemeral.py)."""
    with api_for_flow():  # the temporary API server the CLI launched first thing, if it did (flows/ephemeral.py)
        return clean_shards.with_options(task_runner=task_runner_for(config.runner))(config=config)
