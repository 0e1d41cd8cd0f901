"""The content identity of input shards (pipeline/content_id.py): the up-front identity sees an edit that keeps the
file's size, mtime and member headers; the stream digest is the file's SHA-256, read once; the embeddings record
it and every sample's member digest; a later check of a changed sample invalidates the shard's embeddings."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import tar_bytes, tiny_config
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.content_id import (
    InputChangedError,
    SampleCheck,
    StreamTally,
    local_identity,
    sample_digest,
)
from bicro_clean.pipeline.embed import embed_shards
from bicro_clean.pipeline.layout import embedding_path
from bicro_clean.pipeline.parquet_io import shard_fingerprint
from bicro_clean.pipeline.shards import RawSample
from bicro_clean.pipeline.tar_reader import iter_shard


def _shard(make_image, caption: str, long: bool = False) -> bytes:
    pad = "x" * 2000 if long else ""
    return tar_bytes([("k0.jpg", make_image("JPEG")), ("k0.txt", f"{pad}{caption}{pad}".encode()),
                      ("k1.jpg", make_image("JPEG", color=(0, 0, 200))), ("k1.txt", b"a blue square")])


def _dated(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.utime(path, (1, 1))  # Nix, Bazel: every file dated 1
    return path


def test_an_edit_with_the_same_size_mtime_and_headers_changes_the_identity(tmp_path, make_image):
    old, new = _shard(make_image, "a red square"), _shard(make_image, "a tan square")
    assert len(old) == len(new)
    path = _dated(tmp_path / "a.tar", old)
    before = shard_fingerprint(str(path))
    shutil.copy2(path, tmp_path / "copy.tar")  # cp -p of the same bytes: the same identity
    assert shard_fingerprint(str(tmp_path / "copy.tar")) == before
    _dated(path, new)
    assert shard_fingerprint(str(path)) != before


def test_an_edit_inside_a_long_member_is_left_to_the_later_check(tmp_path, make_image):
    """The documented limit: the middle of a member over 1 KiB is not read up front."""
    old, new = _shard(make_image, "a red square", long=True), _shard(make_image, "a tan square", long=True)
    assert local_identity(str(_dated(tmp_path / "a.tar", old))) == local_identity(str(_dated(tmp_path / "b.tar", new)))


def test_a_compressed_shard_is_identified_by_its_checksummed_ends(tmp_path, make_image):
    old = gzip.compress(_shard(make_image, "a red square"), mtime=0)
    new = gzip.compress(_shard(make_image, "a tan square"), mtime=0)
    assert local_identity(str(_dated(tmp_path / "a.tar.gz", old))) != local_identity(
        str(_dated(tmp_path / "b.tar.gz", new)))


@pytest.mark.parametrize("gz", [False, True])
def test_the_stream_digest_is_the_files_sha256(tmp_path, make_image, gz):
    data = _shard(make_image, "a red square")
    data = gzip.compress(data, mtime=0) if gz else data
    path = tmp_path / ("a.tar.gz" if gz else "a.tar")
    path.write_bytes(data)
    tally = StreamTally()
    items = list(iter_shard(str(path), ReaderConfig(), tally))
    assert [i.key for i in items] == ["k0", "k1"]
    assert tally.summary() == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "complete": True}


def test_the_embeddings_record_the_digests_and_a_changed_sample_invalidates_them(tmp_path, make_image):
    (tmp_path / "shards").mkdir()
    data = _shard(make_image, "a red square")
    path = _dated(tmp_path / "shards" / "a.tar", data)
    config = tiny_config(str(path), tmp_path / "out")
    embed_shards(config)
    target = embedding_path(config.output, str(path))
    meta = json.loads(pq.read_schema(target).metadata[b"bicro_clean"])
    assert meta["input"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "complete": True}
    raws = [i for i in iter_shard(str(path), ReaderConfig()) if isinstance(i, RawSample)]
    assert pq.read_table(target)["sample_sha256"].to_pylist() == [sample_digest(r) for r in raws]

    check = SampleCheck(str(path), target)
    check.verify_row(0, raws[0])  # unchanged: passes
    edited = RawSample(raws[0].shard, raws[0].key, {**raws[0].members, "txt": b"a tan square"}, raws[0].names)
    with pytest.raises(InputChangedError, match=r"^input shard .*a\.tar changed since it was embedded; rerun$"):
        check.verify_row(0, edited)
    assert not os.path.exists(target)  # the rerun embeds the shard again
    with pytest.raises(InputChangedError):  # and nothing may go on without them (a retried write task)
        SampleCheck(str(path), target)
