"""Output writers: deterministic tar bytes (byte-identical members, scores in the JSON), keep keys. Packing the
parts into numbered shards and their stats: tests/pipeline/test_pack.py."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from bicro_clean.pipeline.shards import shard_id
from bicro_clean.pipeline.parts import PartWriter
from bicro_clean.pipeline.writers import json_with_scores, sample_members, write_keep_keys


def _samples(n=5, size=100):
    out = []
    for i in range(n):
        members = {"jpg": bytes([i]) * size, "json": json.dumps({"url": f"u{i}", "truth_clean": True}).encode(),
                   "txt": f"caption {i}".encode()}
        names = {ext: f"k{i}.{ext}" for ext in members}
        out.append((f"k{i}", members, names))
    return out


def _write(out_dir, samples):
    """The samples kept, as the write stage's part (a complete tar of them); its path."""
    writer = PartWriter(str(out_dir / "part.tar"))
    for i, (key, members, names) in enumerate(samples):
        writer.add(i, sample_members(key, members, names, key, {"soft_label": 0.5 + i / 100}))
    writer.close(str(out_dir / "part.index.parquet"), {})
    return out_dir / "part.tar"


def _members(path):
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_members_round_trip_byte_for_byte_and_json_gets_scores(tmp_path):
    samples = _samples(3)
    members = _members(_write(tmp_path, samples))
    assert [m.name for m, _ in members] == [f"k{i}.{e}" for i in range(3) for e in ("jpg", "json", "txt")]
    by_name = {m.name: data for m, data in members}
    for key, original, _ in samples:
        assert by_name[f"{key}.jpg"] == original["jpg"] and by_name[f"{key}.txt"] == original["txt"]
        doc = json.loads(by_name[f"{key}.json"])
        assert doc["url"] == json.loads(original["json"])["url"] and "soft_label" in doc["bicro"]
    assert all((m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644) for m, _ in members)


def test_json_is_created_when_missing_and_renamed_keys_keep_extensions():
    members = sample_members("dir/a", {"png": b"img", "txt": b"cap"}, {"png": "dir/a.png", "txt": "dir/a.TXT"},
                             "s_dir/a", {"p_clean": 1.0})
    assert [n for n, _ in members] == ["s_dir/a.png", "s_dir/a.TXT", "s_dir/a.json"]
    assert json.loads(members[-1][1]) == {"bicro": {"p_clean": 1.0}}
    doc = json.loads(json_with_scores(b'{"b": 1, "a": 2}', {"x": 0.5}))
    assert list(doc) == ["b", "a", "bicro"]  # original field order kept


def test_keep_keys_streams_filtered_files(tmp_path):
    paths = []
    for i in range(2):
        table = pa.table({"shard": [f"s{i}"] * 2, "key": ["a", "b"], "soft_label": [0.9, 0.8]})
        pq.write_table(table, tmp_path / f"{i}.parquet")
        paths.append(str(tmp_path / f"{i}.parquet"))
    assert write_keep_keys(paths, str(tmp_path / "keep.parquet")) == 4
    keys = pq.read_table(tmp_path / "keep.parquet")
    assert keys.column_names == ["shard", "shard_id", "key", "uid"]
    assert keys["shard"].to_pylist() == ["s0", "s0", "s1", "s1"]
    assert keys["uid"].null_count == 4  # filtered files without a uid column: null uids
    # filtered files without a shard_id column (written before it existed): the same ids, computed
    assert keys["shard_id"].to_pylist() == [shard_id(s) for s in ["s0", "s0", "s1", "s1"]]


def test_members_are_copied_not_reencoded(tmp_path):
    # arbitrary binary image bytes (not even a valid image) must come out unchanged
    payload = bytes(range(256)) * 3
    writer = PartWriter(str(tmp_path / "z.tar"))
    writer.add(0, sample_members("k", {"webp": payload}, {"webp": "k.webp"}, "k", {}))
    writer.close(str(tmp_path / "z.index.parquet"), {})
    path = tmp_path / "z.tar"
    assert dict((m.name, d) for m, d in _members(path))["k.webp"] == payload
    assert tarfile.open(fileobj=io.BytesIO(path.read_bytes())).getnames() == ["k.webp", "k.json"]
