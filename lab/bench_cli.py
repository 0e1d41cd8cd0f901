"""The bodies of `bicro-clean bench`'s modes that need no CLI machinery (the command itself stays in
bicro_clean/cli.py): each runs its benchmark, writes the JSON to `out` and returns what the command prints."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional


def embed_only(pairs: int, data: Path, out: Path) -> str:
    """`bench --embed-only`: the embedding stage's throughput."""
    from bicro_clean.lab.bench import markdown_table, run_embed_benchmark

    result = run_embed_benchmark(pairs, data)
    out.write_text(json.dumps(result, indent=2))
    return json.dumps(result, indent=2) + "\n" + markdown_table(result)


def scale(rows: int, shards: int, dim: int, workdir: Optional[Path], out: Path) -> str:
    """`bench --scale`: the run-wide stages on synthetic files, each stage in its own process."""
    from bicro_clean.lab.bench_scale import markdown, run_scale

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run_scale(rows, shards, dim, workdir)
    out.write_text(json.dumps(result, indent=2))
    return markdown(result)


def suite(quick: bool, tiny: bool, data: Path, out: Path, append: Optional[bool], command: str) -> str:
    """`bench` (the suite): every stage's throughput, scaling and memory, appended to docs/benchmarks.md."""
    from bicro_clean.lab.bench_plan import make_plan
    from bicro_clean.lab.bench_suite import run_suite
    from bicro_clean.lab.bench_summary import append_to_doc, markdown

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run_suite(make_plan(quick, tiny), data if data.exists() else None, partial=out)  # survives a kill
    out.write_text(json.dumps(result, indent=2))
    headline = json.dumps({k: result[k] for k in ("overhead_ratio", "overhead_ratio_setting", "embed_pairs_per_s",
                                                 "score_pairs_per_s", "fit_seconds_per_epoch", "peak_rss_mb")},
                          indent=2)
    table = markdown(result)
    if append is None or append:
        append_to_doc(result, command)
    return headline + "\n" + table
