"""A rerun with fewer inputs into the same --out leaves exactly its own outputs (issue 16, defect 12: a 4-shard
folder rerun with 2 shards kept 160 annotated rows under a manifest of 80, and tars of another checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from bicro_clean.pipeline.manifest_shards import read_manifest
from bicro_clean.pipeline.run import run_pipeline
from conftest import tiny_config


def _files(out: Path, folder: str) -> set[str]:
    return {str(p.relative_to(out)) for p in (out / folder).rglob("*") if p.is_file()}


def test_rerun_with_fewer_shards_keeps_only_its_outputs(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    every = sorted(str(p) for p in tiny_shards.glob("*.tar"))
    run_pipeline(tiny_config(every, out), report=False)
    before = {folder: _files(out, folder) for folder in ("annotated", "filtered", "shards", "results")}
    run_pipeline(tiny_config(every[:2], out), report=False)
    manifest = read_manifest(str(out))
    listed = {o["path"] for o in manifest["outputs"]}
    for folder in ("annotated", "filtered", "shards"):
        assert _files(out, folder) == {p for p in listed if p.startswith(folder + "/")}, folder
    assert len(_files(out, "results")) == 2 < len(before["results"])
    annotated_rows = sum(o["count"] for o in manifest["outputs"] if o["kind"] == "annotated")
    assert annotated_rows == manifest["counts"]["in"]
    assert (out / "embeddings").exists() and len(list((out / "embeddings").glob("*.parquet"))) == len(every)
