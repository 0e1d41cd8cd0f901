"""`bicro-clean select`: the run-wide select step across partitions (pipeline/partitions.py).

A crawl run as several partitions with one `--checkpoint` (each its own `--out`, in parallel, on any hosts) is
decided here as one run: the keep-fraction cutoff over every partition's scores and the keys repeated across
them, then each partition's write, finalize and report again with those values. Every failure is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from bicro_clean.cli_support import fail, format_validation_error

FROM_HELP = ("A partition's output folder, or a glob of them ('parts/*', 's3://bucket/parts/*'); repeatable. Each "
             "must be a finished run with the same --checkpoint.")


def select_cmd(
    from_: list[str] = typer.Option(..., "--from", help=FROM_HELP, show_default=False),
    keep_fraction: Optional[float] = typer.Option(None, "--keep-fraction", help="Keep this top fraction of all the "
                                                  "partitions' scored rows (default: the partitions' own rule)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep rows whose column >= threshold."),
    column: Optional[str] = typer.Option(None, "--column", help="Score column the rule uses (default: the "
                                         "partitions')."),
    write_plan: Optional[Path] = typer.Option(None, "--write-plan", help="Only compute: write the run-wide values "
                                              "(rule, cutoff, repeated keys) to this JSON file, for --plan on each "
                                              "partition's host."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", exists=True, dir_okay=False, help="Apply this "
                                             "--write-plan file to the --from partitions instead of computing."),
) -> None:
    """Decide partitions run apart (same --checkpoint) as one run: a run-wide keep-fraction and repeated keys
    across all of them, then each partition's outputs rewritten with them. Prints one JSON summary."""
    from bicro_clean.pipeline.partitions import PartitionError, apply, load_partition, partition_folders, plan

    rule = {k: v for k, v in {"keep_fraction": keep_fraction, "threshold": threshold, "column": column}.items()
            if v is not None}
    if plan_file is not None and (rule or write_plan):
        raise fail("usage", "--plan applies a computed plan: give no --keep-fraction, --threshold, --column or "
                   "--write-plan with it")
    try:
        partitions = [load_partition(folder) for folder in partition_folders(from_)]
        the_plan = _read_plan(plan_file) if plan_file else plan(partitions, rule)
        if write_plan is not None:
            write_plan.write_text(json.dumps(the_plan))
            typer.echo(json.dumps(_plan_summary(the_plan, str(write_plan))))
            return
        results = [apply(partition, the_plan) for partition in partitions]
    except ValidationError as error:
        typer.echo(format_validation_error(error), err=True)
        raise typer.Exit(2)
    except (PartitionError, ValueError, FileNotFoundError) as error:
        raise fail("select", error)
    typer.echo(json.dumps({**_plan_summary(the_plan), "partitions": results}))


def _read_plan(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise fail("select", f"{path}: not a readable plan ({error})")


def _plan_summary(the_plan: dict[str, Any], written: str | None = None) -> dict[str, Any]:
    summary = {"select": the_plan["select"], "cutoff": the_plan["cutoff"], "shards": the_plan["shards"],
               "repeated_keys": len(the_plan["repeated_keys"])}
    return {**summary, "plan": written} if written else summary
