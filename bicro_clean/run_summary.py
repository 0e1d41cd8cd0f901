"""The summary a finished `bicro-clean run` prints: counts, reasons, paths, and what the run estimated."""

from __future__ import annotations

import json
from typing import Any

import typer

from bicro_clean.cli_support import TERMINAL, _duration
from bicro_clean.pipeline.estimates import describe


def print_run_summary(summary: dict[str, Any]) -> None:
    """The run's result on stdout: quiet, one JSON line; default, a table of counts, reasons and paths; verbose, the
    table and the whole summary as JSON."""
    if TERMINAL["mode"] == "quiet":
        typer.echo(json.dumps(summary, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    reasons = sorted(((n, r) for r, n in summary.get("by_reason", {}).items() if r != "kept"), reverse=True)
    table = Table(box=None, pad_edge=False)
    for column in ("in", "kept", "dropped", "errors"):
        table.add_column(column, justify="right")
    table.add_column("top reasons")
    table.add_row(*(f"{summary.get(k, 0):,}" for k in ("in", "kept", "dropped", "errors")),
                  ", ".join(f"{r} {n:,}" for n, r in reasons[:3]) or "-")
    console.print(table)
    cached = f", {summary['cached_shards']} cached" if summary.get("cached_shards") else ""
    console.print(f"output   {summary.get('output')}  ({summary.get('shards', 0)} shards{cached}, "
                  f"{_duration(summary.get('total_seconds', 0.0))})")
    for name in ("report", "manifest"):
        if summary.get(name):
            console.print(f"{name:<9}{summary[name]}")
    cleaned = summary.get("cleaned_shards")
    if cleaned:  # open_clip's --train-data, its sample count from sizes.json beside the shards
        console.print(f"shards   {cleaned['train_data']}  ({cleaned['samples']:,} samples, sizes.json)")
    if summary.get("keep_uids"):  # the file, or why it was not written (no uid in the samples' .json)
        console.print(f"keep_uids {summary['keep_uids']}")
    if "estimates" in summary:  # from clean_score's mean: pipeline/estimates.py
        console.print(describe(summary["estimates"]))
    for lost in summary.get("lost_workers", []):  # the work ran again elsewhere; outputs are unaffected
        shards = ", ".join(lost["shards"])
        console.print(f"lost     worker {lost['name']} in {lost['stage']}: shards {shards} ran again")
    for stage, retried in summary.get("retries", {}).items():
        console.print(f"retried  {stage}: {retried['tasks']} task(s), shards {', '.join(retried['shards'])}")
    if TERMINAL["mode"] == "verbose":
        typer.echo(json.dumps(summary, indent=2, default=str))
