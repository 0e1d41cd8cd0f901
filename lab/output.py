"""Where benchmark figures go: JSON and a Markdown table on stdout, the JSON to a file, the table appended to the
repository's docs/benchmarks.md."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# lab/ sits at the repository root (the editable install maps bicro_clean.lab onto it): ../docs/benchmarks.md
BENCH_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def emit(result: dict[str, Any], table: str, out: Path | None) -> None:
    """What every benchmark script ends with: the figures as JSON and a Markdown table on stdout, JSON to --out."""
    print(json.dumps(result, indent=2))
    print(table)
    if out:
        out.write_text(json.dumps(result, indent=2))


def append_section(section: str, path: Path = BENCH_DOC) -> None:
    """Append (never rewrite: the file holds earlier runs of every benchmark) one run's section."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmarks\n")
    with open(path, "a") as fh:
        fh.write(section)
