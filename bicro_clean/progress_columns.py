"""The columns of the CLI's progress bars (cli_support.Terminal): what each stage counts, how fast, and when it ends.

One bar per running stage: `embed` counts pairs (its total is known before the first shard is read,
pipeline/pair_count.py), `fit` epochs, `score` and `write` shards, `report` annotated files. Each shows its count,
its rate in its own unit (`1,234 pairs/s`, `4.2 s/epoch`, `0.8 shards/s`: the slower ones as seconds per unit)
and the time left at that rate. Rich measures the rate over the last 30 s of progress, so it follows a stage
whose speed changes (decode workers warming up, a slow shard).
"""

from __future__ import annotations

import io
from typing import Any

UNITS = {"embed": ("pairs", "pair"), "fit": ("epochs", "epoch"), "report": ("files", "file")}


def unit_of(stage: str) -> tuple[str, str]:
    """(plural, singular) of what the stage's bar counts."""
    return UNITS.get(stage, ("shards", "shard"))


def rate_text(stage: str, speed: float | None) -> str:
    """`1,234 pairs/s`, `0.8 shards/s`, or under one unit a second `4.2 s/epoch`; "" before there is a rate."""
    if not speed or speed <= 0:
        return ""
    plural, singular = unit_of(stage)
    if speed >= 100:
        return f"{speed:,.0f} {plural}/s"
    if speed >= 1:
        return f"{speed:.1f} {plural}/s"
    return f"{1 / speed:.1f} s/{singular}"


def count_text(completed: float, total: float | None) -> str:
    """`1,234/5,000` (thousands separated: pair counts run to millions), `1,234` without a total yet."""
    return f"{int(completed):,}/{int(total):,}" if total else f"{int(completed):,}"


def columns() -> list[Any]:
    """The bar's columns: stage, bar, count, detail (the unit and, for embed, the shards done), rate, elapsed, ETA."""
    from rich import progress as bars
    from rich.text import Text

    class Count(bars.ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(count_text(task.completed, task.total))

    class Rate(bars.ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(rate_text(task.description, task.speed), style="progress.data.speed")

    return [bars.TextColumn("{task.description:<8}"), bars.BarColumn(), Count(), bars.TextColumn("{task.fields[unit]}"),
            Rate(), bars.TimeElapsedColumn(), bars.TextColumn("eta"), bars.TimeRemainingColumn()]


def unit_detail(stage: str, items: int) -> str:
    """The text beside the count: the unit, and for embed the shards done so far."""
    plural = unit_of(stage)[0]
    if stage == "embed":
        return f"{plural}, {items} shards done"
    return f"{plural}, {items:,} pairs" if stage == "fit" and items else plural


def snapshot(progress: Any, width: int = 160) -> str:
    """The bars as plain text, as they would be drawn now (what a test or a log can read)."""
    from rich.console import Console

    if progress is None:
        return ""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(progress.make_tasks_table(progress.tasks))
    return console.file.getvalue()
