"""Progress of the stages, for display only: a process-wide hook the stages report to, whatever runs them.

Stages call `report(stage, advance=..., total=..., items=...)` (embed per batch of pairs, fit per epoch, score and
write per shard) and `pipeline.run` calls `stage_done(stage, seconds, tally)` when a stage ends. Embed counts
pairs: `plan_pairs` sets its total before any shard is read, from the shards' tar indexes or a running estimate
(pipeline/pair_count.py), and `finish` corrects it as each shard is done (`items` counts the shards done).
All are no-ops until someone installs a sink (the CLI installs one that draws bars with a rate and an ETA and
prints one line per stage), so library users and tests see nothing. Reports come from any thread (Prefect runs
tasks in threads); a sink must be thread-safe. A worker in another process has no sink: on Dask a relay
(`install_relay`) sends its reports to the process that has one (flows/progress_relay.py); elsewhere (Ray,
process pools) its stages run without live bars. That is why a stage's closing line is built from its `Tally`,
which the run computes from the tasks' results in the process that holds the sink: it is true whichever process
or machine did the work. Nothing here changes what a stage computes or writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol


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
_relay: Callable[[tuple[str, tuple[Any, ...]]], None] | None = None  # a worker's way to the display's process
_plans: dict[str, Any] = {}  # stage -> its pair_count.PairPlan, in the process that holds the sink


def install(sink: Sink | None) -> Sink | None:
    """Make `sink` the process's display (None: back to no display); returns the one it replaces."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def install_relay(relay: Callable[[tuple[str, tuple[Any, ...]]], None] | None) -> Any:
    """In a worker process without a sink: send every report, as (function name, arguments), through `relay`
    to the process that has one, which passes it to `replay`. Returns the relay it replaces."""
    global _relay
    previous, _relay = _relay, relay
    return previous


def current_relay() -> Any:
    """The relay installed in this process (None: reports go to the sink, if any)."""
    return _relay


def replay(message: tuple[str, tuple[Any, ...]]) -> None:
    """A report a worker relayed, made here (where the sink and the stage's pair plan are)."""
    name, args = message
    if name in ("report", "finish"):
        {"report": report, "finish": finish}[name](*args)


def active() -> bool:
    """Whether reports go anywhere (a sink here, or a relay to one): a stage skips display-only work otherwise."""
    return _sink is not None or _relay is not None


def report(stage: str, advance: int = 0, total: int = 0, items: int = 0) -> None:
    """`stage` made `advance` units of progress (embed: pairs; fit: epochs; score, write: shards); `total` adds to
    the units it expects (negative: a correction); `items` counts a secondary unit shown beside the bar (embed:
    shards done; fit: pairs fitted)."""
    relay, sink = _relay, _sink
    if relay is not None:
        relay(("report", (stage, advance, total, items)))
    elif sink is not None:
        sink.report(stage, advance, total, items)


def plan_pairs(stage: str, shards: list[str]) -> None:
    """Set `stage`'s total in pairs for `shards`, unless a plan of this run already covers them (the run plans
    all its shards once; a group run on its own, or `bicro-clean embed`, plans its own). The count runs in the
    background (pipeline/pair_count.py), so the stage never waits for it."""
    if _sink is None or _relay is not None or not shards:
        return
    plan = _plans.get(stage)
    if plan is not None and not plan.closed and all(plan.covers(shard) for shard in shards):
        return
    from bicro_clean.pipeline.pair_count import PairPlan, count_in_background

    if plan is not None:
        plan.closed = True
    _plans[stage] = plan = PairPlan(shards)
    count_in_background(plan, shards, lambda change: report(stage, total=change))


def finish(stage: str, shard: str, rows: int, cached: bool = False) -> None:
    """`shard` of `stage` is done with `rows` rows (`cached`: found finished, no work now): its total corrected
    (pipeline/pair_count.PairPlan.finish) and one more shard done."""
    relay = _relay
    if relay is not None:
        relay(("finish", (stage, shard, rows, cached)))
        return
    plan = _plans.get(stage)
    change = plan.finish(shard, rows, cached) if plan is not None else 0
    report(stage, total=change, items=1)


def stage_done(stage: str, seconds: float, tally: Tally | None = None) -> None:
    plan = _plans.pop(stage, None)
    if plan is not None:
        plan.closed = True
    sink = _sink
    if sink is not None:
        sink.stage_done(stage, seconds, tally)
