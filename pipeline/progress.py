"""Progress of the stages, for display only: a process-wide hook the stages report to, whatever runs them.

Stages call `report(stage, advance=..., total=..., items=...)` (embed per shard and per batch of pairs, fit per
epoch, score and write per shard) and `pipeline.run` calls `stage_done(stage, seconds)` when a stage ends. Both
are no-ops until someone installs a sink (the CLI installs one that draws bars and prints one line per stage),
so library users and tests see nothing. Reports come from any thread (Prefect runs tasks in threads); a sink
must be thread-safe. Workers in other processes (Dask, Ray) have no sink: their stages still run, undisplayed.
Nothing here changes what a stage computes or writes.
"""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    def report(self, stage: str, advance: int, total: int, items: int) -> None:
        """`advance` units done, `total` more units expected, `items` secondary units (pairs) done."""

    def stage_done(self, stage: str, seconds: float) -> None: ...


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


def stage_done(stage: str, seconds: float) -> None:
    sink = _sink
    if sink is not None:
        sink.stage_done(stage, seconds)
