"""The `clean-shards` Prefect flow: the same stage functions as `pipeline.run`, as mapped tasks.

Only orchestration lives here. Every task calls a plain stage function that reads and writes files and skips
work whose outputs already exist with the same hashes, so a killed run resumes by simply running again, and a
task can run on any machine that sees the output location. Task results are paths and small dicts.
"""

# No `from __future__ import annotations`: Prefect resolves the flow signature (CleanConfig) at run time.

import functools
import logging
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from bicro_clean.flows.runners import task_runner_for
from bicro_clean.pipeline import run as stages
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.embed import embed_one_shard
from bicro_clean.pipeline.score import load_model, score_shard
from bicro_clean.pipeline.shards import shard_id

logger = logging.getLogger(__name__)
IO_RETRIES = dict(retries=2, retry_delay_seconds=5)  # transient IO (object stores, NFS hiccups)


@functools.lru_cache(maxsize=2)
def _model(checkpoint: str) -> Any:
    """One model per worker process and checkpoint, not one per task."""
    return load_model(checkpoint)


@task(name="embed", task_run_name="embed-{shard_name}", **IO_RETRIES)
def embed_task(shard: str, config: CleanConfig, shard_name: str = "") -> str:
    return embed_one_shard(shard, config).path


@task(name="fit")
def fit_task(config: CleanConfig, embedding_paths: list[str]) -> str:
    return stages.fit_stage(config, embedding_paths)


@task(name="score", task_run_name="score-{shard_name}", **IO_RETRIES)
def score_task(shard: str, config: CleanConfig, checkpoint: str, shard_name: str = "") -> str:
    return score_shard(shard, config.output, checkpoint, _model(checkpoint))


@task(name="run-wide-values")
def run_wide_task(config: CleanConfig, embedding_paths: list[str], score_paths: list[str]) -> tuple[Any, Any]:
    """Keep-fraction cutoff and keys repeated across shards: computed once, passed to every shard task."""
    cutoff = None
    if config.select.keep_fraction is not None:
        cutoff = stages.global_cutoff(score_paths, config.select.column, config.select.keep_fraction)
    return cutoff, stages.duplicate_keys(embedding_paths)


@task(name="write", task_run_name="write-{shard_name}", **IO_RETRIES)
def write_task(shard: str, config: CleanConfig, checkpoint: str, run_wide: tuple[Any, Any],
               shard_name: str = "") -> dict[str, Any]:
    cutoff, duplicates = run_wide
    result = stages.score_shard_stage(config, shard, checkpoint, cutoff, duplicates, _model(checkpoint))
    return {k: result[k] for k in ("shard", "shard_id", "counts", "cached")}


@task(name="finalize")
def finalize_task(config: CleanConfig, shard_ids: list[str], checkpoint: str) -> str:
    results = [stages.load_shard_result(config, sid) for sid in shard_ids]
    return stages.finalize_stage(config, results, checkpoint)


@task(name="report")
def report_task(config: CleanConfig, manifest: str) -> Any:
    return stages.write_report_if_available(config, manifest)


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
    run_logger = get_run_logger()
    stages.check_run_config(config)
    shards = stages.input_shards(config)
    names = [shard_id(s) for s in shards]
    run_logger.info("clean-shards: %d input shards -> %s", len(shards), config.output)
    embedded = embed_task.map(shards, config=unmapped(config), shard_name=names).result()
    checkpoint = fit_task(config, embedded)
    scores = score_task.map(shards, config=unmapped(config), checkpoint=unmapped(checkpoint),
                            shard_name=names).result()
    run_wide = run_wide_task(config, embedded, scores)
    results = write_task.map(shards, config=unmapped(config), checkpoint=unmapped(checkpoint),
                             run_wide=unmapped(run_wide), shard_name=names).result()
    manifest = finalize_task(config, [r["shard_id"] for r in results], checkpoint)
    report = report_task(config, manifest)
    summary = {"output": config.output, "manifest": manifest, "checkpoint": checkpoint, "report": report,
               "shards": len(results), "cached_shards": sum(r["cached"] for r in results),
               **stages.total_counts(results)}
    _publish_artifacts(summary, _shard_rows(results))
    return summary


def run_flow(config: CleanConfig) -> dict[str, Any]:
    """Run the flow in this process (Prefect's ephemeral API, no server) on the configured task runner."""
    return clean_shards.with_options(task_runner=task_runner_for(config.runner))(config=config)
