"""Concurrent runs on one --out (issue 16, defect 13): the same configuration may overlap (its writes are atomic
and identical), another configuration is refused with one line while the first runs, and a dead run's lock
never blocks."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bicro_clean.pipeline.outlock import OutputBusyError, OutputError, output_lock


def test_same_config_shares_other_config_is_refused(tmp_path: Path) -> None:
    with output_lock(str(tmp_path), "aaaa"):
        with output_lock(str(tmp_path), "aaaa"):
            pass
        with pytest.raises(OutputBusyError, match="different configuration"):
            with output_lock(str(tmp_path), "bbbb"):
                pass
    with output_lock(str(tmp_path), "bbbb"):  # the first run ended: free again
        pass


def test_a_killed_run_does_not_block(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from bicro_clean.pipeline.outlock import output_lock\n"
        f"with output_lock({str(tmp_path)!r}, 'aaaa'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError):
            with output_lock(str(tmp_path), "bbbb"):
                pass
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 5
    while True:  # the kernel drops the lock with the process
        try:
            with output_lock(str(tmp_path), "bbbb"):
                break
        except OutputBusyError:
            assert time.time() < deadline
            time.sleep(0.05)


def test_a_run_with_another_config_on_a_busy_folder_exits_2_with_one_line(tiny_shards: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bicro_clean.cli import app
    from bicro_clean.pipeline import resume
    from bicro_clean.pipeline.parquet_io import digest
    from bicro_clean.pipeline.shards import expand_shard_spec, shard_id
    from conftest import tiny_config

    spec, out = str(tiny_shards / "*.tar"), tmp_path / "out"
    busy = tiny_config(spec, out, select={"threshold": 0.7})  # another configuration, "running" meanwhile
    ids = [shard_id(s) for s in expand_shard_spec(spec)]
    with output_lock(str(out), digest(resume.config_hash(busy), ids)):
        result = CliRunner().invoke(app, ["run", "--input", spec, "--out", str(out), "--encoder", "tiny",
                                          "--runner", "none", "--threshold", "0.5"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "different configuration" in lines[0]


@pytest.mark.parametrize("where", ["afile", "afile/sub"])
def test_an_output_that_cannot_be_a_folder_is_one_line_before_anything_is_written(tmp_path: Path, where) -> None:
    """What a deployment run (no CLI check before it) fails with, instead of a NotADirectoryError."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"^--out '.*afile(/sub)?' (is an existing file|cannot be created)"):
        with output_lock(str(tmp_path / where), "hash"):
            pass
    assert (tmp_path / "afile").read_text() == "x"
