"""What `bicro-clean run` prints: one line per stage and a summary by default (no library chatter), one line with
--quiet, the full log with --verbose; on both runners, in a child process running the console script.

stderr is a pipe here, not a terminal, so no progress bars are drawn: the counts are the lines a log file gets.
The bars themselves (their totals, rates and ETAs) are checked in-process, on a terminal of the test's own.
"""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import numbered_shards

SCRIPT = Path(sys.executable).with_name("bicro-clean")
NOISE = ("httpx", "faiss.loader", "telemetry", "Traceback", "INFO root", "bicro epoch")
STAGES = ("embed", "fit", "score", "select", "write", "finalize", "report")


@pytest.fixture(scope="module")
def pairs_300(tmp_path_factory) -> Path:
    """150 images x 2 captions in 6 shards of 50 samples."""
    return numbered_shards(tmp_path_factory.mktemp("terminal-data"), 150, (16, 16), shard_size=50)


def _run(shards: Path, out: Path, *options: str, runner: str = "local", extra: tuple[str, ...] = ()) -> list[str]:
    """The non-empty lines of stdout + stderr; a user's environment (none of our defaults preset). `options` go
    before the command (--quiet, --verbose), `extra` after it."""
    drop = ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PREFECT_HOME"] = str(out.parent / f"{out.name}-prefect-home")
    command = [str(SCRIPT), *options, "run", "--input", str(shards / "*.tar"), "--out", str(out), "--encoder", "tiny",
               "--epochs", "2", "--runner", runner, *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return [line for line in output.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["local", "none"])
def test_default_quiet_and_verbose_output(pairs_300, tmp_path, runner) -> None:
    """~20-40 s per runner on 2 cores (three runs, the later two on cached stages): slow."""
    # a keep fraction, so the summary has drops to name: the tiny random encoder carries no signal, clean_score cannot
    # tell its pairs from a random re-pairing, estimates a clean share near 1 and keeps them all at its threshold
    extra = ("--keep-fraction", "0.8")
    lines = _run(pairs_300, tmp_path / "out", runner=runner, extra=extra)
    text = "\n".join(lines)
    assert len(lines) <= 18, text  # the summary (up to 9 lines) and one line per stage
    assert not [word for word in NOISE if word in text], text
    for stage in STAGES:
        assert any(line.startswith(stage) for line in lines), (stage, text)
    # fit: every epoch trained, the calibration's cross-fitted models' included
    assert "embed    6 shards, 300 pairs" in text and re.search(r"^fit      300 pairs, \d+ epochs", text, re.M)
    assert "below_keep_fraction 60" in text and str(tmp_path / "out" / "report.html") in text

    quiet = _run(pairs_300, tmp_path / "out", "--quiet", runner=runner, extra=extra)  # cached stages: quick
    assert len(quiet) <= 2, quiet
    assert json.loads(quiet[-1])["in"] == 300

    verbose = _run(pairs_300, tmp_path / "out", "--verbose", runner=runner, extra=extra)
    assert len(verbose) > len(lines), verbose
    assert "Traceback" not in "\n".join(verbose)


def test_verbose_and_quiet_exclude_each_other() -> None:
    done = subprocess.run([str(SCRIPT), "--verbose", "--quiet", "run"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "exclude each other" in done.stderr and "Traceback" not in done.stderr


class _Watched:
    """A progress sink in front of the CLI's Terminal (drawing on a terminal of its own): every embed report with
    the total known at that moment and the bars as a user would see them right then."""

    def __init__(self, terminal) -> None:
        self.terminal, self.embed = terminal, []

    def report(self, stage, advance, total, items) -> None:
        self.terminal.report(stage, advance, total, items)
        if stage == "embed":
            known = (self.embed[-1][0] if self.embed else 0) + total
            self.embed.append((known, advance, items, self.terminal.snapshot()))

    def stage_done(self, stage, seconds, tally=None) -> None:
        self.terminal.stage_done(stage, seconds, tally)


@pytest.mark.slow
def test_embed_counts_pairs_with_a_total_and_an_eta_before_the_first_shard_is_done(tmp_path) -> None:
    """A 3-shard crawl (300 pairs), the default flow and decode workers: the embed bar's total is the crawl's pair
    count, from the tar indexes, before any shard is done, and the bar shows a rate and an ETA while the first
    shard is still being embedded (a bar of whole shards has no rate until a shard is done). ~30 s: slow."""
    from rich.console import Console

    from bicro_clean.cli_support import Terminal
    from bicro_clean.flows.clean_shards import run_flow
    from bicro_clean.flows.ephemeral import start_early
    from bicro_clean.pipeline import progress
    from conftest import TINY_BICRO, TINY_EMBED, tiny_config

    shards = numbered_shards(tmp_path / "data", 150, (16, 16), shard_size=100)
    assert len(list(shards.glob("*.tar"))) == 3
    embed = {k: v for k, v in TINY_EMBED.items() if k != "num_workers"}  # the default decode workers
    config = tiny_config(str(shards / "*.tar"), tmp_path / "out", embed=embed, bicro=TINY_BICRO)
    screen = io.StringIO()
    terminal = Terminal("default", console=Console(file=screen, force_terminal=True, width=160, highlight=False,
                                                   color_system=None))
    watched = _Watched(terminal)
    previous = progress.install(watched)
    start_early()  # Prefect's temporary API server, as `bicro-clean run` starts it (flows/ephemeral.py)
    try:
        summary = run_flow(config)
    finally:
        progress.install(previous)
        terminal.close()
    assert summary["in"] == 300
    first_done = next(i for i, (_, _, items, _) in enumerate(watched.embed) if items)
    before = watched.embed[:first_done]
    assert before and before[-1][0] == 300, watched.embed[:first_done + 1]  # the total, before a shard is done
    assert sum(advance for _, advance, _, _ in watched.embed) == 300 and watched.embed[-1][0] == 300
    with_eta = [bars for *_, bars in before if re.search(r"[\d,]+ pairs/s .*eta \d+:\d\d:\d\d", bars)]
    assert with_eta, [bars for *_, bars in before]
    assert "/300 pairs, 0 shards done" in with_eta[0]
    assert "embed    3 shards, 300 pairs" in screen.getvalue()  # the stage's closing line, as before
