"""Progress of the stages, for display only: a process-wide hook the stages report to, whatever runs them.

Stages call `report(stage, advance=..., total=..., items=...)` (embed per shard and per batch of pairs, fit per
epoch, score and write per shard) and `pipeline.run` calls `stage_done(stage, seconds, tally)` when a stage ends.
Both are no-ops until someone installs a sink (the CLI installs one that draws bars and prints one line per
stage), so library users and tests see nothing. Reports come from any thread (Prefect runs tasks in threads); a
sink must be thread-safe. Workers in other processes (Dask, Ray) have no sink: their stages still run, without
live bars. That is why a stage's closing line is built from its `Tally`, which the run computes from the tasks'
results in the process that holds the sink: it is true whichever process or machine did the work.
Nothing here changes what a stage computes or writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Tally:
    """What a per-shard stage did, counted from its tasks' results: `shards` handled, `cached` of them found
    finished (their outputs record the cache key), `pairs` computed, `tasks` run and `retried` of them run more
    than once (a retry after an error, or a worker lost while running it)."""

    shards: int = 0
    cached: int = 0
    pairs: int = 0
    tasks: int = 0
    retried: int = 0


def describe(stage: str, tally: Tally) -> str:
    """The closing line's detail for a per-shard stage: `embed 6 shards, 300 pairs`, `all shards cached`,
    `score 8 shards, 2 cached, 1 retried`."""
    done = tally.shards - tally.cached
    if stage == "embed":
        text = f"{done} shards, {tally.pairs:,} pairs" if done else "all shards cached"
        text += f", {tally.cached} cached" if done and tally.cached else ""
    else:
        text = f"{tally.shards} shards" + (f", {tally.cached} cached" if tally.cached else "")
    return text + (f", {tally.retried} retried" if tally.retried else "")


class Sink(Protocol):
    def report(self, stage: str, advance: int, total: int, items: int) -> None:
        """`advance` units done, `total` more units expected, `items` secondary units (pairs) done."""

    def stage_done(self, stage: str, seconds: float, tally: Tally | None = None) -> None:
        """`tally`: the stage's counts from its task results (per-shard stages), else None."""


_sink: Sink | None = None


def install(sink: Sink | None) -> Sink | None:
    """Make `sink` the process's display (None: back to no display); returns the one it replaces."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def report(stage: str, advance: int = 0, total: int = 0, items: int = 0) -> None:
    """`stage` made `advance` units of progress; `total` adds to the units it expects (shards, epochs);
    `items` counts a secondary unit (embedded or fitted pairs) shown beside the bar."""
    sink = _sink
    if sink is not None:
        sink.report(stage, advance, total, items)


def stage_done(stage: str, seconds: float, tally: Tally | None = None) -> None:
    sink = _sink
    if sink is not None:
        sink.stage_done(stage, seconds, tally)
