"""Finalize as a streamed merge: the manifest's per-shard part goes to manifest_shards.parquet row by row, and
`read_manifest` gives back exactly the single-file record (inputs, outputs) a reader used to get."""

import json

import pyarrow.parquet as pq

from bicro_clean.pipeline import manifest_shards
from bicro_clean.pipeline.finalize import Collected
from bicro_clean.pipeline.layout import MANIFEST


def _result(i):
    damage = {"reason": "shard_truncated", "detail": "at byte 10"} if i % 3 == 0 else None
    return {"shard": f"s3://b/{i:05d}.tar", "shard_id": f"{i:05d}", "fingerprint": None if i == 2 else f"etag{i}",
            "cutoff": {"n_keep": 1}, "reading": {"samples_read": i, "samples_lost": 1, "damage": damage},
            "counts": {"in": i + 2, "kept": i, "dropped": 1, "errors": 1, "by_reason": {"kept": i, "x": 1}},
            "renamed_keys": [{"shard": "s", "key": "k", "output_key": f"{i}_k"}] if i == 4 else [],
            "outputs": [{"path": f"annotated/{i:05d}.parquet", "kind": "annotated", "count": i + 2, "sha256": "a"},
                        {"path": f"shards/{i:05d}-00000.tar", "kind": "tar", "count": None, "sha256": "t"}]}


def test_the_shards_table_reads_back_as_the_single_file_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_shards, "BATCH", 3)  # several row groups
    results = [_result(i) for i in range(8)]
    collected = Collected()
    with manifest_shards.ShardTable(str(tmp_path)) as table:
        for result in results:
            table.add(result)
            collected.add(result)
    assert table.rows == 8 == pq.read_metadata(tmp_path / manifest_shards.SHARDS_TABLE).num_rows
    run_wide = [{"path": "keep_keys.parquet", "kind": "keep_keys", "count": 5, "sha256": "k"}]
    (tmp_path / MANIFEST).write_text(json.dumps({"counts": collected.counts(), "outputs": run_wide}))
    record = manifest_shards.read_manifest(str(tmp_path))
    assert record["inputs"] == [{"url": r["shard"], "shard_id": r["shard_id"], "fingerprint": r["fingerprint"],
                                 **r["reading"]} for r in results]
    assert record["outputs"] == [o for r in results for o in r["outputs"]] + run_wide
    assert record["counts"] == {"in": 44, "kept": 28, "dropped": 8, "errors": 8, "by_reason": {"kept": 28, "x": 8}}
    assert collected.cutoff == {"n_keep": 1} and collected.shards == 8 and len(collected.renamed_keys) == 1
    assert collected.filtered == [] and len(collected.listed) == 16


def test_an_older_single_file_manifest_is_read_as_it_is(tmp_path):
    old = {"inputs": [{"url": "a.tar"}], "outputs": [{"path": "x", "kind": "annotated"}], "counts": {}}
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    assert manifest_shards.read_manifest(str(tmp_path)) == old
    assert manifest_shards.read_manifest(str(tmp_path / "none")) is None


def test_a_failed_table_leaves_no_file(tmp_path):
    try:
        with manifest_shards.ShardTable(str(tmp_path)) as table:
            table.add(_result(1))
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert not (tmp_path / manifest_shards.SHARDS_TABLE).exists()
    assert [p.name for p in tmp_path.iterdir()] == []
