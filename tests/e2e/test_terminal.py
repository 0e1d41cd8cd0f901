"""What `bicro-clean run` prints: one line per stage and a summary by default (no library chatter), one line with
--quiet, the full log with --verbose; on both runners, in a child process running the console script.

stderr is a pipe here, not a terminal, so no progress bars are drawn: the counts are the lines a log file gets.
"""

import json
import os
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
    assert len(lines) <= 15, text
    assert not [word for word in NOISE if word in text], text
    for stage in STAGES:
        assert any(line.startswith(stage) for line in lines), (stage, text)
    assert "embed    6 shards, 300 pairs" in text and "fit      300 pairs, 2 epochs" in text
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
