"""The sequence of stages, written once: embed -> fit -> score -> select -> write -> finalize -> report.

`run_stages` is the whole run for any executor. An executor decides only *how* a stage runs: `InProcess`
calls the stage functions directly (`--runner none`, `run_pipeline`); the Prefect flow (flows/clean_shards.py)
runs each as a task, mapped over shards, on threads, Dask or Ray. The checks, the order, and what each stage
reads and writes are the same for both. Each stage skips work whose output already records its cache key
(pipeline.resume), so rerunning a command redoes nothing and a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol, TypeVar

from bicro_clean.pipeline import progress, resume, select
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.embed import embed_stage
from bicro_clean.pipeline.finalize import finalize_stage, total_counts
from bicro_clean.pipeline.fit import fit_stage, run_encoder
from bicro_clean.pipeline.outlock import output_lock
from bicro_clean.pipeline.parquet_io import digest
from bicro_clean.pipeline.report import write_report
from bicro_clean.pipeline.score import score_stage
from bicro_clean.pipeline.shards import expand_shard_spec, shard_id
from bicro_clean.pipeline.write import write_stage

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Executor(Protocol):
    """How stages run. `map` runs `stage(item, *shared)` for every item and returns the results in order."""

    def shard_batches(self, shards: list[str]) -> list[list[str]]:
        """How the embed stage groups shards: one batch per task that streams them together."""

    def map(self, stage: Callable[..., T], items: list[Any], *shared: Any) -> list[T]: ...

    def call(self, stage: Callable[..., T], *args: Any) -> T: ...


class InProcess:
    """Every stage in this process, one after the other; one embed loader streams all shards at once."""

    def shard_batches(self, shards: list[str]) -> list[list[str]]:
        return [shards]

    def map(self, stage: Callable[..., T], items: list[Any], *shared: Any) -> list[T]:
        return [stage(item, *shared) for item in items]

    def call(self, stage: Callable[..., T], *args: Any) -> T:
        return stage(*args)


def input_shards(config: CleanConfig) -> list[str]:
    return list(expand_shard_spec(config.input, allow_pipe=config.reader.allow_pipe))


def report_stage(config: CleanConfig, manifest_path: str) -> str:
    return write_report(config, manifest_path)


class StageClock:
    """Wall seconds per stage, measured around each executor call (so on Prefect/Dask they include scheduling)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str, run: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return run(*args)
        finally:
            seconds = time.perf_counter() - start
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            progress.stage_done(stage, seconds)  # the display's line for this stage (pipeline/progress.py)

    def summary(self) -> dict[str, Any]:
        return {"stage_seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "total_seconds": round(time.perf_counter() - self.started, 2)}


def run_stages(config: CleanConfig, executor: Executor,
               report: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The whole run on `executor`: the summary (counts, paths, shards reused from an earlier run, each stage's
    wall seconds `stage_seconds` and the run's `total_seconds`) and each shard's write summary. `report=False`
    leaves out report.html (the load test measures the data path alone)."""
    select.check_select(config)
    shards = input_shards(config)
    # one set of inputs and configuration at a time per output folder (pipeline/outlock.py)
    with output_lock(config.output, digest(resume.config_hash(config), [shard_id(s) for s in shards])):
        return _run_stages(config, executor, shards, report)


def _run_stages(config: CleanConfig, executor: Executor, shards: list[str],
                report: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    clock = StageClock()
    logger.info("run: %d input shards -> %s", len(shards), config.output)
    batches = clock("embed", executor.map, embed_stage, executor.shard_batches(shards), config)
    embedded = [path for batch in batches for path in batch]
    select.check_select(config, run_encoder(embedded))
    checkpoint = clock("fit", executor.call, fit_stage, config, embedded)
    progress.report("score", total=len(shards))
    scores = clock("score", executor.map, score_stage, shards, config, checkpoint)
    run_wide = clock("run_wide", executor.call, select.run_wide_values, config, embedded, scores)
    progress.report("write", total=len(shards))
    written = clock("write", executor.map, write_stage, shards, config, run_wide)
    manifest = clock("finalize", executor.call, finalize_stage, config, [shard_id(s) for s in shards], checkpoint)
    report_path = clock("report", executor.call, report_stage, config, manifest) if report else None
    summary = {"output": config.output, "manifest": manifest, "checkpoint": checkpoint, "report": report_path,
               "shards": len(written), "cached_shards": sum(w["cached"] for w in written), **total_counts(written),
               **clock.summary()}
    logger.info("run: stage seconds %s", summary["stage_seconds"])
    return summary, written


def run_pipeline(config: CleanConfig, report: bool = True) -> dict[str, Any]:
    """The whole run in this process, without Prefect."""
    return run_stages(config, InProcess(), report)[0]
