"""`bicro-clean bench --e2e` in its tiny form: a few dozen 64x48 pairs, the tiny encoder, the default runner.
Every field of the JSON is there, the measured ratio is positive and the run's outputs exist. No timing is
asserted (shared CI machines)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from bicro_clean.cli import app

PAIRS = 36
STAGES = ["embed", "fit", "score", "run_wide", "write", "pack", "finalize", "report"]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow  # two fresh interpreters, each starting Prefect's API: ~30 s on an idle 2-core machine
def test_tiny_e2e_bench_writes_every_field(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # the children's ephemeral API: isolated
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    out, work = tmp_path / "e2e.json", tmp_path / "work"
    result = CliRunner().invoke(app, ["bench", "--e2e", "--pairs", str(PAIRS), "--size", "64x48", "--encoder",
                                      "tiny", "--workdir", str(work), "--out", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    for key in ("machine", "data", "settings", "device", "run", "embed_alone", "stage_seconds", "pairs_per_s",
                "stage_pairs_per_s", "peak_rss_mib", "gpu_peak_mib", "ratio_run_to_embed", "ratio_how"):
        assert key in figures, key
    assert figures["data"]["pairs"] == PAIRS and figures["data"]["image_size"] == [64, 48]
    assert figures["settings"] == {"encoder": "tiny", "runner": "local", "other": "every CleanConfig default"}
    assert list(figures["stage_seconds"]) == STAGES and list(figures["stage_pairs_per_s"]) == STAGES
    assert _positive(figures["ratio_run_to_embed"]) and _positive(figures["pairs_per_s"])
    run, embed = figures["run"], figures["embed_alone"]
    assert run["in"] == embed["in"] == PAIRS and run["errors"] == embed["errors"] == 0
    assert run["kept"] + run["dropped"] == PAIRS
    for part in (run, embed):
        assert _positive(part["seconds"]) and _positive(part["peak_rss_mib"]) and _positive(part["pairs_per_s"])
        assert part["wall_with_startup_s"] >= part["seconds"]
    assert math.isclose(figures["ratio_run_to_embed"], run["seconds"] / embed["seconds"], rel_tol=0.01)
    assert (figures["gpu_peak_mib"] is None) == (figures["device"] == "cpu")
    assert run["outputs"]["manifest"] and run["outputs"]["report"] and run["outputs"]["keep_keys"]
    assert (work / "run" / "manifest.json").is_file() and (work / "run" / "report.html").is_file()
    assert len(list((work / "embed" / "embeddings").glob("*.parquet"))) == 1
    assert "| **run / embed alone** |" in result.output


def test_size_is_checked():
    result = CliRunner().invoke(app, ["bench", "--e2e", "--size", "64by48"])
    assert result.exit_code == 2 and "WIDTHxHEIGHT" in result.output
