"""Output writers: deterministic cleaned tars (byte-identical members, scores in the JSON), resharding, stats."""

import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from bicro_clean.pipeline.writers import ShardedTarWriter, json_with_scores, member_bytes, sample_members, write_keep_keys


def _samples(n=5, size=100):
    out = []
    for i in range(n):
        members = {"jpg": bytes([i]) * size, "json": json.dumps({"url": f"u{i}", "truth_clean": True}).encode(),
                   "txt": f"caption {i}".encode()}
        names = {ext: f"k{i}.{ext}" for ext in members}
        out.append((f"k{i}", members, names))
    return out


def _write(out_dir, samples, maxcount=10, maxsize=10**9, reasons=None):
    writer = ShardedTarWriter(str(out_dir), "in-abc", maxcount, maxsize)
    for i, (key, members, names) in enumerate(samples):
        writer.add(sample_members(key, members, names, key, {"soft_label": 0.5 + i / 100}))
        writer.note("kept")
    for reason in reasons or []:
        writer.note(reason)
    return writer.close("in.tar")


def _members(path):
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_members_round_trip_byte_for_byte_and_json_gets_scores(tmp_path):
    samples = _samples(3)
    [shard] = _write(tmp_path, samples)
    members = _members(shard.path)
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


def test_resharding_by_maxcount_and_stats_reconcile(tmp_path):
    shards = _write(tmp_path, _samples(5), maxcount=2, reasons=["noisy_division", "decode_error"])
    assert [s.name for s in shards] == ["in-abc-00000", "in-abc-00001", "in-abc-00002"]
    assert [s.successes for s in shards] == [2, 2, 1]
    stats = [json.loads((tmp_path / f"{s.name}_stats.json").read_text()) for s in shards]
    assert sum(s["count"] for s in stats) == 7 and sum(s["successes"] for s in stats) == 5
    assert stats[-1]["status_dict"] == {"decode_error": 1, "kept": 1, "noisy_division": 1}
    for shard, stat in zip(shards, stats):
        data = open(shard.path, "rb").read()
        assert stat["sha256"] == hashlib.sha256(data).hexdigest() and stat["bytes"] == len(data)


def test_resharding_by_maxsize(tmp_path):
    samples = _samples(4, size=3000)
    one = sum(member_bytes(n, len(d)) for n, d in sample_members(*samples[0][:3], "k0", {"soft_label": 0.5}))
    shards = _write(tmp_path, samples, maxsize=2 * one + 1024)
    assert [s.successes for s in shards] == [2, 2]
    assert all(s.bytes <= 2 * one + 1024 + tarfile.RECORDSIZE for s in shards)


def test_nothing_kept_still_gives_one_empty_tar_with_stats(tmp_path):
    [shard] = _write(tmp_path, [], reasons=["noisy_division"])
    assert _members(shard.path) == [] and shard.count == 1 and shard.successes == 0


def test_two_writes_are_byte_identical(tmp_path):
    a = _write(tmp_path / "a", _samples(5), maxcount=2)
    b = _write(tmp_path / "b", _samples(5), maxcount=2)
    assert [s.sha256 for s in a] == [s.sha256 for s in b]
    for name in ("in-abc-00000_stats.json", "in-abc-00002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_abort_leaves_no_file(tmp_path):
    writer = ShardedTarWriter(str(tmp_path), "x", 10, 10**9)
    writer.add([("k.txt", b"1")])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_keep_keys_streams_filtered_files(tmp_path):
    paths = []
    for i in range(2):
        table = pa.table({"shard": [f"s{i}"] * 2, "key": ["a", "b"], "soft_label": [0.9, 0.8]})
        pq.write_table(table, tmp_path / f"{i}.parquet")
        paths.append(str(tmp_path / f"{i}.parquet"))
    assert write_keep_keys(paths, str(tmp_path / "keep.parquet")) == 4
    keys = pq.read_table(tmp_path / "keep.parquet")
    assert keys.column_names == ["shard", "key", "uid"] and keys["shard"].to_pylist() == ["s0", "s0", "s1", "s1"]
    assert keys["uid"].null_count == 4  # filtered files without a uid column: null uids


def test_members_are_copied_not_reencoded(tmp_path):
    # arbitrary binary image bytes (not even a valid image) must come out unchanged
    payload = bytes(range(256)) * 3
    writer = ShardedTarWriter(str(tmp_path), "z", 10, 10**9)
    writer.add(sample_members("k", {"webp": payload}, {"webp": "k.webp"}, "k", {}))
    [shard] = writer.close("in")
    assert dict((m.name, d) for m, d in _members(shard.path))["k.webp"] == payload
    assert tarfile.open(fileobj=io.BytesIO(open(shard.path, "rb").read())).getnames() == ["k.webp", "k.json"]
