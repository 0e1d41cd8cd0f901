"""Outputs to join on: url/uid on every row (error rows too), shard ids that do not depend on how a path was
spelled, uid in keep_keys.parquet and DataComp's keep_uids.npy."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import tar_bytes, tiny_config
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import read_shard
from bicro_clean.pipeline.embed import _row
from bicro_clean.pipeline.finalize import KEEP_UIDS, UID_DTYPE, uid_words, write_keep_uids
from bicro_clean.pipeline.layout import embedding_path
from bicro_clean.pipeline.manifest_shards import read_manifest
from bicro_clean.pipeline.run import run_pipeline
from bicro_clean.pipeline.shards import canonical_url, shard_id


def _uid(n: int) -> str:
    return hashlib.md5(str(n).encode()).hexdigest()  # 32 hex chars, like DataComp's


def _meta(n: int, **extra) -> bytes:
    return json.dumps({"url": f"http://img.example/{n}.jpg", "uid": _uid(n), **extra}).encode()


def _png(n: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (37 * n % 256, 91 * n % 256, 53 * n % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def _sample(n: int, meta: bytes | None = None) -> list[tuple[str, bytes]]:
    members = [(f"{n:05d}.png", _png(n)), (f"{n:05d}.txt", f"a picture number {n}".encode())]
    return members + [(f"{n:05d}.json", _meta(n) if meta is None else meta)]


# ------------------------------------------------------------------------------------------------ url/uid


def test_error_rows_carry_url_and_uid_when_the_json_was_read(shards):
    members = [
        *_sample(0),
        ("00001.png", _png(1)), ("00001.json", _meta(1)),  # missing_caption
        ("00002.png", b"<html>not an image</html>"), ("00002.txt", b"x"), ("00002.json", _meta(2)),  # decode_error
        ("00003.png", _png(3)), ("00003.txt", b"x"), ("00003.json", b"{not json"),  # invalid_json: stays None
        ("00004.png", _png(4)), ("00004.txt", b""), ("00004.json", b'["a list"]'),  # empty_caption, no object
        *_sample(0),  # duplicate_key: the repeat's own json
        ("00005.json", _meta(5)), ("00005.png", _png(5)),  # cut below: shard_truncated
    ]
    data = shards.tar_bytes(members)
    cut = shards.header_offsets(data)["00005.png"] + 700
    path = shards.write("s.tar", data[:cut])
    rows = [_row(item) for item in read_shard(str(path), ReaderConfig())]
    by_key = {(r["key"], r["reason"]): (r["url"], r["uid"]) for r in rows}
    for key, reason in [("00000", None), ("00001", "missing_caption"), ("00002", "decode_error"),
                        ("00000", "duplicate_key"), ("00005", "shard_truncated")]:
        n = int(key)
        assert by_key[(key, reason)] == (f"http://img.example/{n}.jpg", _uid(n)), (key, reason)
    assert by_key[("00003", "invalid_json")] == (None, None)
    assert by_key[("00004", "empty_caption")] == (None, None)
    assert by_key[("", "shard_truncated")] == (None, None)


# ------------------------------------------------------------------------------------------------ shard ids


def test_shard_id_does_not_depend_on_the_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "shards" / "00000.tar")
    spellings = ["shards/00000.tar", "./shards/00000.tar", "shards//00000.tar", "shards/x/../00000.tar",
                 absolute, f"file://{absolute}"]
    assert {shard_id(s) for s in spellings} == {shard_id(absolute)}
    assert shard_id(absolute).startswith("00000-")
    assert len({embedding_path("out", s) for s in spellings}) == 1
    assert shard_id("shards/00001.tar") != shard_id(absolute)
    # symlinks are not resolved: a link is its own shard name (repointing it must not move outputs)
    assert canonical_url("link/00000.tar") == str(tmp_path / "link" / "00000.tar")


def test_urls_are_normalised_but_object_keys_kept_literal():
    assert shard_id("HTTPS://Example.COM:443/a/./b/../00000.tar") == shard_id("https://example.com/a/00000.tar")
    assert shard_id("S3://bucket/a/00000.tar") == shard_id("s3://bucket/a/00000.tar")
    assert shard_id("s3://bucket/a//00000.tar") != shard_id("s3://bucket/a/00000.tar")  # different objects
    assert shard_id("s3://Bucket/00000.tar") != shard_id("s3://bucket/00000.tar")
    assert canonical_url("simplecache::s3://b/x.tar") == "simplecache::s3://b/x.tar"
    assert canonical_url("pipe:cat ./x.tar") == "pipe:cat ./x.tar"


# ------------------------------------------------------------------------------------------------ keep_uids


def test_uid_words_are_datacomps_format():
    uids = ["0123456789abcdefFEDCBA9876543210", "ffffffffffffffff0000000000000001"]
    words = uid_words(pa.array(uids))
    assert words.dtype == np.dtype("u8,u8") == UID_DTYPE
    assert [tuple(int(v) for v in w) for w in words] == [(int(u[:16], 16), int(u[16:], 16)) for u in uids]
    assert uid_words(pa.array([uids[0], None])) is None
    assert uid_words(pa.array([uids[0], uids[0][:-1] + "g"])) is None
    assert uid_words(pa.array([uids[0][:31]])) is None


def _keep_keys(path: Path, uids: list[str | None]) -> str:
    table = pa.table({"shard": ["s"] * len(uids), "key": [str(i) for i in range(len(uids))],
                      "uid": pa.array(uids, pa.string())})
    pq.write_table(table, path)
    return str(path)


def test_keep_uids_sorted_and_skipped_with_one_log_line(tmp_path, caplog):
    uids = [_uid(n) for n in range(50)]
    target = str(tmp_path / KEEP_UIDS)
    assert write_keep_uids(_keep_keys(tmp_path / "k.parquet", uids), target) == 50
    back = np.load(target)
    expected = np.array(sorted((int(u[:16], 16), int(u[16:], 16)) for u in uids), UID_DTYPE)
    assert back.dtype == UID_DTYPE and np.array_equal(back, expected)
    with caplog.at_level(logging.INFO, logger="bicro_clean.pipeline.finalize"):
        reason = write_keep_uids(_keep_keys(tmp_path / "k2.parquet", uids[:3] + [None]), target)
    assert reason == "not written: 1 of 4 kept samples have no uid (img2dataset's `uid` field in the sample's .json)"
    assert not os.path.exists(target)  # the earlier file would not match this keep_keys
    assert len([r for r in caplog.records if KEEP_UIDS in r.getMessage()]) == 1
    assert write_keep_uids(_keep_keys(tmp_path / "k3.parquet", []), target) == "not written: no sample was kept"


@pytest.fixture(scope="module")
def uid_run(tmp_path_factory):
    """Two shards whose samples all have DataComp uids, plus one undecodable sample with a uid; run end to end."""
    root = tmp_path_factory.mktemp("uids")
    for shard in range(2):
        members = [m for n in range(shard * 8, shard * 8 + 8) for m in _sample(n)]
        if shard == 1:
            members += [("00099.png", b"not an image"), ("00099.txt", b"broken"), ("00099.json", _meta(99))]
        (root / "shards").mkdir(exist_ok=True)
        (root / "shards" / f"{shard:05d}.tar").write_bytes(tar_bytes(members))
    out = root / "out"
    run_pipeline(tiny_config(str(root / "shards"), out, select={"keep_fraction": 0.5}))
    return out


def test_annotated_rows_and_keep_keys_carry_uids(uid_run):
    annotated = pa.concat_tables([pq.read_table(p) for p in sorted((uid_run / "annotated").glob("*.parquet"))])
    rows = annotated.to_pylist()
    assert all(r["uid"] == _uid(int(r["key"])) and r["url"].endswith(f"/{int(r['key'])}.jpg") for r in rows)
    assert [r["reason"] for r in rows if r["decision"] == "error"] == ["decode_error"]
    keep_keys = pq.read_table(uid_run / "keep_keys.parquet")
    assert keep_keys.column_names == ["shard", "shard_id", "key", "uid"]
    kept = sorted((r["shard"], r["shard_id"], r["key"], r["uid"]) for r in rows if r["decision"] == "keep")
    assert sorted(tuple(r.values()) for r in keep_keys.to_pylist()) == kept


def test_keep_uids_is_written_and_recorded_in_the_manifest(uid_run):
    keep_keys = pq.read_table(uid_run / "keep_keys.parquet")
    uids = np.load(uid_run / KEEP_UIDS)
    expected = sorted((int(u[:16], 16), int(u[16:], 16)) for u in keep_keys["uid"].to_pylist())
    assert uids.dtype == np.dtype("u8,u8") and [tuple(int(v) for v in w) for w in uids] == expected
    manifest = json.loads((uid_run / "manifest.json").read_text())
    entry = next(o for o in manifest["outputs"] if o["kind"] == "keep_uids")
    assert entry["path"] == KEEP_UIDS and entry["count"] == len(expected) > 0
    assert entry["sha256"] == hashlib.sha256((uid_run / KEEP_UIDS).read_bytes()).hexdigest()


def test_no_keep_uids_without_uids(tiny_shards, tmp_path):
    run_pipeline(tiny_config(str(tiny_shards / "*.tar"), tmp_path, select={"keep_fraction": 0.5}))
    assert not (tmp_path / KEEP_UIDS).exists()
    manifest = read_manifest(str(tmp_path))
    assert "keep_uids" not in {o["kind"] for o in manifest["outputs"]}
    assert manifest["keep_uids"] == (f"not written: {manifest['counts']['kept']} of {manifest['counts']['kept']} "
                                     "kept samples have no uid (img2dataset's `uid` field in the sample's .json)")
    assert pq.read_table(tmp_path / "keep_keys.parquet")["uid"].null_count == manifest["counts"]["kept"]


def test_keep_uids_merged_from_sorted_runs_is_np_save_of_the_sorted_array(tmp_path, monkeypatch):
    from bicro_clean.pipeline import uid_merge

    monkeypatch.setattr(uid_merge, "RUN_ROWS", 37)  # many runs, merged in small blocks
    monkeypatch.setattr(uid_merge, "BLOCK_ROWS", 5)
    rng = np.random.default_rng(0)
    uids = [f"{int(h):016x}{int(l):016x}" for h, l in zip(rng.integers(0, 4, 500), rng.integers(0, 2**63, 500))]
    uids += uids[:20]  # repeated uids stay, in order
    target = str(tmp_path / KEEP_UIDS)
    assert write_keep_uids(_keep_keys(tmp_path / "k.parquet", uids), target) == 520
    words = uid_words(pa.array(uids))
    expected = tmp_path / "expected.npy"
    np.save(expected, words[np.lexsort((words["f1"], words["f0"]))])
    assert open(target, "rb").read() == expected.read_bytes()
