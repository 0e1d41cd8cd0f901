"""The sequence of stages, written once: embed -> fit -> score -> select -> write -> pack -> finalize -> report.

`run_stages` is the whole run for any executor. An executor decides only *how* a stage runs: `InProcess`
calls the stage functions directly (`--runner none`, `run_pipeline`); the Prefect flow (flows/clean_shards.py)
runs each as a task, the per-shard stages mapped over groups of shards (pipeline/shard_groups.py), on threads,
Dask or Ray. The checks, the order, and what each stage reads and writes are the same for both. Each stage
skips work whose output already records its cache key (pipeline.resume), so rerunning a command redoes nothing
and a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol, TypeVar

from bicro_clean.pipeline import owner, progress, resume, select, shard_groups
from bicro_clean.pipeline.checkpoint_use import check_checkpoint, given_checkpoint, record_encoder
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.finalize import finalize_stage, total_counts
from bicro_clean.pipeline.fit import fit_stage, run_encoder
from bicro_clean.pipeline.manifest_shards import summary_fields
from bicro_clean.pipeline.outlock import output_lock
from bicro_clean.pipeline.pack import pack_stage
from bicro_clean.pipeline.parquet_io import digest
from bicro_clean.pipeline.report import Scans, report_plan, report_scan, write_report
from bicro_clean.pipeline.shards import expand_shard_spec, shard_id
from bicro_clean.pipeline.shard_groups import GroupResult, embed_group, score_group, write_group

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Executor(Protocol):
    """How stages run. `map` runs `stage(item, *shared)` for every item and returns the results in order."""

    def shard_batches(self, shards: list[str]) -> list[list[str]]:
        """How the per-shard stages (embed, score, write) group shards: one group per task, in input order."""

    def map(self, stage: Callable[..., T], items: list[Any], *shared: Any) -> list[T]: ...

    def call(self, stage: Callable[..., T], *args: Any) -> T: ...


class InProcess:
    """Every stage in this process, one after the other; one group of all shards (one embed loader streams them,
    the score stage packs their rows into as few model calls as it can)."""

    def shard_batches(self, shards: list[str]) -> list[list[str]]:
        return [shards]

    def map(self, stage: Callable[..., T], items: list[Any], *shared: Any) -> list[T]:
        return [stage(item, *shared) for item in items]

    def call(self, stage: Callable[..., T], *args: Any) -> T:
        return stage(*args)


def input_shards(config: CleanConfig, note: bool = True) -> list[str]:
    """The shards of `config.input`, less any inside `config.output` (a run never reads its own outputs; `note`:
    log how many were skipped)."""
    return owner.outside_output(config, list(expand_shard_spec(config.input, allow_pipe=config.reader.allow_pipe)),
                                note)


def report_stage(config: CleanConfig, manifest_path: str, scans: Scans | None = None) -> str:
    return write_report(config, manifest_path, scans)


def mapped_report(executor: Executor, config: CleanConfig, manifest_path: str) -> str:
    """The report's per-row scan mapped over groups of annotated files; one task merges the small partials and
    writes the page (the same bytes as one pass)."""
    paths, setup = report_plan(config, manifest_path)
    progress.report("report", total=len(paths))  # the bar counts annotated files scanned
    partials = executor.map(report_scan, executor.shard_batches(paths), setup)
    return executor.call(report_stage, config, manifest_path, (setup, partials))


class StageClock:
    """Wall seconds per stage, measured around each executor call (so on Prefect/Dask they include scheduling)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str, run: Callable[..., T], *args: Any) -> T:
        start, tally = time.perf_counter(), None
        try:
            result = run(*args)
            if isinstance(result, list) and result and isinstance(result[0], GroupResult):
                tally = shard_groups.tally(result)  # a per-shard stage's line counts its groups' results
            return result
        finally:
            seconds = time.perf_counter() - start
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            progress.stage_done(stage, seconds, tally)  # the display's line for this stage (pipeline/progress.py)

    def summary(self) -> dict[str, Any]:
        return {"stage_seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "total_seconds": round(time.perf_counter() - self.started, 2)}


def run_stages(config: CleanConfig, executor: Executor,
               report: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The whole run on `executor`: the summary (counts, paths, shards reused from an earlier run, each stage's
    wall seconds `stage_seconds` and the run's `total_seconds`) and each shard's write summary. `report=False`
    leaves out report.html (the load test measures the data path alone)."""
    select.check_select(config)
    check_checkpoint(config)  # a given checkpoint: complete, and fitted on this run's encoder, before any work
    shards = input_shards(config)
    # one set of inputs and configuration at a time per output folder (pipeline/outlock.py)
    with output_lock(config.output, digest(resume.config_hash(config), [shard_id(s) for s in shards])):
        owner.claim_output(config)  # another configuration's folder: refused before any work (pipeline/owner.py)
        return _run_stages(config, executor, shards, report)


def _run_stages(config: CleanConfig, executor: Executor, shards: list[str],
                report: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    clock = StageClock()
    logger.info("run: %d input shards -> %s", len(shards), config.output)
    groups = executor.shard_batches(shards)
    progress.plan_pairs("embed", shards)  # the embed bar's total in pairs, counted while the stage starts
    embeds = clock("embed", executor.map, embed_group, groups, config)
    embedded = shard_groups.outputs(embeds)
    encoder = run_encoder(embedded)
    select.check_select(config, encoder)
    if config.checkpoint:  # fit once, score anywhere: an earlier run's model, nothing fitted (checkpoint_use.py)
        checkpoint = clock("fit", given_checkpoint, config.checkpoint, encoder, config.output)
    else:
        checkpoint = clock("fit", executor.call, fit_stage, config, embedded)
        record_encoder(checkpoint, encoder)  # what a later run given this checkpoint is checked against
    progress.report("score", total=len(shards))
    scored = clock("score", executor.map, score_group, groups, config, checkpoint)
    scores = shard_groups.outputs(scored)
    run_wide = clock("run_wide", executor.call, select.run_wide_values, config, embedded, scores)
    progress.report("write", total=len(shards))
    owner.retire_manifest(config.output)  # the outputs it lists are rewritten now; finalize writes it again, last
    writes = clock("write", executor.map, write_group, groups, config, run_wide)
    written = shard_groups.outputs(writes)
    # the kept samples into shards/NNNNN.tar numbered over the run, then annotated/ (pipeline/pack.py)
    cleaned = clock("pack", pack_stage, executor, config, shards, run_wide)
    execution = shard_groups.execution(embeds + scored + writes)
    manifest = clock("finalize", executor.call, finalize_stage, config, [shard_id(s) for s in shards], checkpoint,
                     execution or None)
    report_path = clock("report", mapped_report, executor, config, manifest) if report else None
    summary = {"output": config.output, "manifest": manifest, "checkpoint": checkpoint, "report": report_path,
               "cleaned_shards": cleaned, "shards": len(written), "cached_shards": sum(w["cached"] for w in written), **total_counts(written),
               "lost_workers": [], "retries": {}, **execution, **summary_fields(config.output), **clock.summary()}
    logger.info("run: stage seconds %s", summary["stage_seconds"])
    return summary, written


def run_pipeline(config: CleanConfig, report: bool = True) -> dict[str, Any]:
    """The whole run in this process, without Prefect."""
    return run_stages(config, InProcess(), report)[0]
