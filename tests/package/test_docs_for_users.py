"""The user-facing docs (README.md, ARCHITECTURE.md, docs/*.md) are written for users: no rounds of development work
("Session 4"), no references to this project's issue tracker by number ("issue 14", "#22"), and no paths that only
exist on a development machine (/work/..., /root/..., /home/..., /tmp/<dir>/..., ../shared/...). Commands in the
docs use placeholders such as FLICKR8K_DIR instead, so a user can run them as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "ARCHITECTURE.md", *(ROOT / "docs").glob("*.md")])

# Each rule: a name for the message and the pattern. Case-insensitive, so "session 2" and "Issue 14" count too.
RULES: dict[str, re.Pattern[str]] = {
    "a round of development work": re.compile(r"\bsessions? \d", re.IGNORECASE),
    # "issue 14", "issue #14", "issues 13": a number right after the word. "issues" in prose, or another project's
    # tracker in a URL (github.com/org/repo/issues/123), carries no number after a space or '#'.
    "an issue number": re.compile(r"\bissues? ?#\d+|\bissues? \d+", re.IGNORECASE),
    # "#22" standing alone; not an HTML entity (&#39;), a URL fragment (page#3) or a Markdown anchor (#results).
    "an issue number (#N)": re.compile(r"(?<![\w&/#])#\d+\b"),
    # Absolute development paths. A bare /tmp (where TMPDIR points, say) is fine; a folder inside it is not.
    "a development-machine path": re.compile(r"(?<![\w.:/-])/(?:work|root|home)/|(?<![\w.:/-])/tmp/[\w.-]+"),
    "the development checkout's shared folder": re.compile(r"\.\./shared\b"),
}


def violations(text: str) -> list[str]:
    """'line N: rule: the matched text' for every forbidden mention in `text`."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for rule, pattern in RULES.items():
            found.extend(f"line {number}: {rule}: {m.group(0)!r}" for m in pattern.finditer(line))
    return found


def test_the_docs_are_found() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in DOCS}
    assert {"README.md", "ARCHITECTURE.md", "docs/benchmarks.md", "docs/history.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_is_written_for_users(path: Path) -> None:
    found = violations(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(ROOT)} is written for users; rephrase:\n" + "\n".join(found)


@pytest.mark.parametrize("text", [
    "## Session 5: throughput on 2 CPU cores (issue 13), 2026-11-28",
    "the GPU targets of issue 13 are unmeasured",
    "Against issue 14's targets: clean_score AUROC",
    "see issue #22 for the rest",
    "Issues 13 and 14 asked for it",
    "fixed in #22.",
    "(fixed in session 2)",
    "`bicro-clean bench --quick --out /work/runs/quick2.json`",
    "(`/tmp/prof/thr2.py main|thread`)",
    "`bicro-clean run --input /tmp/pf/demo/shards --out /tmp/pf/r`",
    "ssh in and look at /root/.cache/x",
    "PYTHONPATH=/home/dev/bicro-clean",
    "`bicro-clean evaluate --data ../shared/data/flickr8k`",
])
def test_forbidden_mentions_are_found(text: str) -> None:
    assert violations(text), text


@pytest.mark.parametrize("text", [
    "GitHub issues and pull requests are welcome; see the open issues.",
    "a known Prefect problem (https://github.com/PrefectHQ/prefect/issues/12345)",
    "see [Results](docs/bicro.md#results) and [timings](docs/benchmarks.md#test-suite)",
    "a caption with &#39; in it",
    "Local scratch (`TMPDIR`, /tmp by default) needs 12 bytes per key",
    "`--checkpoint s3://crawl/fit/checkpoint/bicro-<key>`",
    "`/no/such/folder`: `checkpoint error: /no/such/folder is not a checkpoint folder`",
    "`bicro-clean evaluate --data FLICKR8K_DIR --noise-rate 0.4 --out s0.4.json`",
    "a Prefect session of 2 workers; 3 sessions in parallel",
    "shards/00000.tar .. shards/00031.tar, the first run in the session",
])
def test_legitimate_text_passes(text: str) -> None:
    assert not violations(text), violations(text)
