"""`bicro-clean bench --scale` with a tiny --rows: every run-wide stage runs in its own process on synthetic
files that the pipeline reads as its own, and the JSON has seconds, peak RSS and rows per stage. No timing is
asserted (shared CI machines)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from bicro_clean import cli
from bicro_clean.lab.bench_scale import STAGES
from bicro_clean.pipeline import select


def test_bench_scale_runs_every_run_wide_stage_on_files_in_the_pipelines_format(tmp_path):
    out, work = tmp_path / "scale.json", tmp_path / "work"
    done = CliRunner().invoke(cli.app, ["bench", "--scale", "--rows", "900", "--shards", "3", "--dim", "4",
                                        "--out", str(out), "--workdir", str(work)])
    assert done.exit_code == 0, done.output
    result = json.loads(out.read_text())
    assert (result["rows"], result["shards"], result["dim"]) == (900, 3, 4)
    assert [s["stage"] for s in result["stages"]] == list(STAGES)
    for stage in result["stages"]:
        assert stage["seconds"] >= 0 and stage["peak_rss_mib"] > 0 and stage["rows"] > 0
        assert stage["peak_rss_mib"] >= stage["rss_after_imports_mib"]
    assert "| select |" in done.output
    # the run-wide values are what the pipeline computes from the files the benchmark wrote
    scores = pa.concat_tables([pq.read_table(p) for p in sorted((work / "out" / "scores").glob("*.parquet"))])
    values = scores["clean_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    want = select.cutoff_in_memory(values, np.asarray(scores["shard"].to_pylist()),
                                   np.asarray(scores["key"].to_pylist()), 0.7)
    chosen = next(s for s in result["stages"] if s["stage"] == "select")
    assert chosen["cutoff"] == want.as_dict() and chosen["repeated_keys"] == 5
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert manifest["counts"]["in"] == 900 and manifest["counts"]["kept"] == want.n_keep
    assert np.load(work / "out" / "keep_uids.npy").shape == (want.n_keep,)
    assert (work / "out" / "report.html").stat().st_size > 0
