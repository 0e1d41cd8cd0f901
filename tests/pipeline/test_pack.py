"""The pack step: parts of several input shards -> shards/NNNNN.tar numbered over the run, every one full but the
last, byte for byte what tarfile writes for the same members; stats per output shard; annotated's columns."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bicro_clean.pipeline.layout import part_path
from bicro_clean.pipeline.pack import pack_group, place_group, write_sizes
from bicro_clean.pipeline.pack_plan import output_name, plan_outputs
from bicro_clean.pipeline.parts import PartWriter, read_index
from bicro_clean.pipeline.writers import member_bytes, sample_blob, sample_members, tar_info

from pack_fixture import pack_config, pack_parts, write_part


def _members(i: int, size: int = 100) -> list[tuple[str, bytes]]:
    return sample_members(f"k{i}", {"jpg": bytes([i % 256]) * size, "txt": f"caption {i}".encode()},
                          {"jpg": f"k{i}.jpg", "txt": f"k{i}.txt"}, f"k{i}", {"soft_label": 0.5})


def _tarfile_stream(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for name, data in members:
            tar.addfile(tar_info(name, len(data)), io.BytesIO(data))
    return buffer.getvalue()


def _inputs(shards: int = 5, rows: int = 6, dropped: tuple[int, ...] = (2,)):
    """`shards` input shards of `rows` rows; rows whose index is in `dropped` were dropped by the rule."""
    counter = iter(range(10**6))
    return [[(None, "low_clean_score") if r in dropped else (_members(next(counter)), "kept") for r in range(rows)]
            for _ in range(shards)]


def test_input_shards_are_packed_into_shards_numbered_over_the_run(tmp_path):
    inputs = _inputs()  # 5 shards x 5 kept = 25 kept
    plan, stats = pack_parts(tmp_path, inputs, maxcount=10)
    assert [o.name for o in plan.outputs] == ["00000", "00001", "00002"]
    assert [s["successes"] for s in stats] == [10, 10, 5]  # full but the last
    kept = [members for shard in inputs for members, _ in shard if members is not None]
    for i, out in enumerate(plan.outputs):
        data = (tmp_path / "shards" / f"{out.name}.tar").read_bytes()
        assert data == _tarfile_stream([m for members in kept[10 * i:10 * i + 10] for m in members])
        assert stats[i]["sha256"] == hashlib.sha256(data).hexdigest() and stats[i]["bytes"] == len(data)
    # 00000.tar: in/0 (5 kept) and in/1 (5 kept); each input's rows counted once, dropped ones with their tar
    assert stats[0]["input_shards"] == ["in/0.tar", "in/1.tar"] and stats[1]["input_shards"] == ["in/2.tar", "in/3.tar"]
    assert sum(s["count"] for s in stats) == 30
    assert all(s["count"] == s["successes"] + s["dropped"] + s["failed"] for s in stats)
    assert stats[0]["status_dict"] == {"kept": 10, "low_clean_score": 2}


def test_an_input_shard_larger_than_maxcount_spans_shards(tmp_path):
    plan, stats = pack_parts(tmp_path, _inputs(shards=2, rows=7, dropped=()), maxcount=3)
    assert [s["successes"] for s in stats] == [3, 3, 3, 3, 2]
    assert [[(s.sid, s.kept) for s in o.segments] for o in plan.outputs][1:3] == [
        [("in0", (3, 6))], [("in0", (6, 7)), ("in1", (0, 2))]]
    assert plan.placed["in1"] == [("00002", 1, 0, 2), ("00003", 0, 2, 5), ("00004", 0, 5, 7)]
    assert {sid: [name for name, _ in owned] for sid, owned in plan.owned.items()} == {
        "in0": ["00000", "00001", "00002"], "in1": ["00003", "00004"]}


def test_maxsize_cuts_by_the_bytes_each_write_recorded(tmp_path):
    one = len(sample_blob(_members(0, size=3000)))
    plan, stats = pack_parts(tmp_path, [[(_members(i, size=3000), "kept") for i in range(3)],
                                        [(_members(i, size=3000), "kept") for i in range(3, 5)]],
                             maxsize=2 * one + 1024 + 1024)  # room for two samples and the end blocks
    assert [s["successes"] for s in stats] == [2, 2, 1]
    assert plan.outputs[1].segments[0].sid == "in0" and plan.outputs[1].segments[1].sid == "in1"
    assert all(o.payload + 1024 <= 2 * one + 2048 for o in plan.outputs)
    assert one == sum(member_bytes(n, len(d)) for n, d in _members(0, size=3000))


def test_a_sample_larger_than_maxsize_gets_a_shard_alone(tmp_path):
    plan, stats = pack_parts(tmp_path, [[(_members(i, size=5000), "kept") for i in range(3)]], maxsize=1000)
    assert [s["successes"] for s in stats] == [1, 1, 1]


def test_nothing_kept_still_gives_one_empty_tar_with_stats(tmp_path):
    plan, stats = pack_parts(tmp_path, [[(None, "noisy_division"), (None, "decode_error")], []])
    assert [o.name for o in plan.outputs] == ["00000"]
    assert (tmp_path / "shards" / "00000.tar").read_bytes() == _tarfile_stream([])
    assert (stats[0]["count"], stats[0]["successes"], stats[0]["dropped"], stats[0]["failed"]) == (2, 0, 1, 1)


def test_dropped_rows_go_with_the_kept_sample_before_them(tmp_path):
    rows = [(None, "low_clean_score"), (_members(0), "kept"), (None, "decode_error"), (_members(1), "kept"),
            (None, "noisy_division")]
    _, stats = pack_parts(tmp_path, [rows, [(None, "below_keep_fraction")]], maxcount=1)
    assert [s["status_dict"] for s in stats] == [{"decode_error": 1, "kept": 1, "low_clean_score": 1},
                                                 {"below_keep_fraction": 1, "kept": 1, "noisy_division": 1}]
    # a pair the rule dropped is `dropped`; only a sample the reader could not use is `failed` (img2dataset's sense)
    assert [(s["dropped"], s["failed"]) for s in stats] == [(1, 1), (2, 0)]


def test_two_packs_are_byte_identical_and_a_rerun_rewrites_nothing(tmp_path):
    for folder in ("a", "b"):
        pack_parts(tmp_path / folder, _inputs(), maxcount=4)
    names = sorted(p.name for p in (tmp_path / "a" / "shards").glob("0*"))
    assert names == sorted(p.name for p in (tmp_path / "b" / "shards").glob("0*")) and len(names) == 14
    for name in names:
        assert (tmp_path / "a" / "shards" / name).read_bytes() == (tmp_path / "b" / "shards" / name).read_bytes()
    config = pack_config(tmp_path / "a", maxcount=4)
    assert pack_group(plan_outputs(config, [f"in{i}" for i in range(5)]).outputs, config) == 0


def test_place_writes_each_kept_rows_output_shard_and_index_then_removes_the_part(tmp_path):
    plan, _ = pack_parts(tmp_path, _inputs(shards=2, rows=7, dropped=(0, 4)), maxcount=4)
    config = pack_config(tmp_path, maxcount=4)
    place_group([(sid, plan.placed[sid], plan.owned[sid]) for sid in ("in0", "in1")], config)
    rows = pq.read_table(tmp_path / "annotated" / "in1.parquet").to_pylist()
    assert [(r["decision"], r["output_shard"], r["output_index"]) for r in rows] == [
        ("drop", None, None), ("keep", "00001.tar", 1), ("keep", "00001.tar", 2), ("keep", "00001.tar", 3),
        ("drop", None, None), ("keep", "00002.tar", 0), ("keep", "00002.tar", 1)]
    filtered = pq.read_table(tmp_path / "filtered" / "in1.parquet")
    assert filtered.num_rows == 5 and filtered["output_index"].null_count == 0
    marker = json.loads((tmp_path / "results" / "in1.json").read_text())
    assert [o["path"] for o in marker["outputs"]] == ["annotated/in1.parquet", "filtered/in1.parquet",
                                                      "shards/.parts/in1.index.parquet",
                                                      "shards/00002.tar", "shards/00002_stats.json"]
    for suffix in (".tar", ".parquet", ".json"):  # the part is gone; its index stays for a later plan
        assert not Path(part_path(str(tmp_path), "in1", suffix)).exists()
    assert list(read_index(part_path(str(tmp_path), "in1", ".index.parquet"))[0]) == [1, 2, 3, 5, 6]


def test_a_changed_input_shard_moves_the_later_samples_and_their_shards_are_written_again(tmp_path):
    config, sids = pack_config(tmp_path, maxcount=4), ["in0", "in1", "in2"]
    plan, _ = pack_parts(tmp_path, _inputs(shards=3, rows=3, dropped=()), maxcount=4)
    place_group([(sid, plan.placed[sid], plan.owned[sid]) for sid in sids], config)  # parts packed and removed
    assert plan_outputs(config, sids).missing == []  # the same run again needs no part

    write_part(config, "in1", "in/1.tar", [(_members(100), "kept")], key="changed")  # in1 now keeps one sample
    # both cleaned shards change (00000.tar: in0 + in1's sample, 00001.tar: in2): in0's and in2's samples are
    # needed again, but their parts are gone, so the run writes them again
    assert plan_outputs(config, sids).missing == ["in0", "in2"]
    again = _inputs(shards=3, rows=3, dropped=())
    write_part(config, "in0", "in/0.tar", again[0])
    write_part(config, "in2", "in/2.tar", again[2])
    plan = plan_outputs(config, sids)
    assert [o.count for o in plan.outputs] == [4, 3] and pack_group(plan.outputs, config) == 2
    place_group([(sid, plan.placed[sid], plan.owned[sid]) for sid in sids], config)
    # in0 lists 00000.tar, whose content changed (in1's samples): its marker names the new bytes
    entry = next(o for o in json.loads((tmp_path / "results" / "in0.json").read_text())["outputs"]
                 if o["path"] == "shards/00000.tar")
    assert entry["sha256"] == hashlib.sha256((tmp_path / "shards" / "00000.tar").read_bytes()).hexdigest()
    rows = pq.read_table(tmp_path / "annotated" / "in2.parquet").to_pylist()
    assert [(r["output_shard"], r["output_index"]) for r in rows] == [("00001.tar", 0), ("00001.tar", 1),
                                                                      ("00001.tar", 2)]


def test_the_marker_listing_a_shard_follows_its_content(tmp_path):
    """in0 kept nothing but starts 00000.tar, so its marker lists it; in1 changes: 00000.tar is packed again and
    in0's marker, whose own rows did not move, names the new bytes."""
    config, sids = pack_config(tmp_path), ["in0", "in1"]
    plan, _ = pack_parts(tmp_path, [[(None, "low_clean_score")] * 2, [(_members(i), "kept") for i in range(3)]])
    place_group([(sid, plan.placed[sid], plan.owned[sid]) for sid in sids], config)
    write_part(config, "in1", "in/1.tar", [(_members(7), "kept")], key="changed")
    plan = plan_outputs(config, sids)
    assert plan.missing == [] and plan.placed["in0"] == [] and pack_group(plan.outputs, config) == 1
    place_group([(sid, plan.placed[sid], plan.owned[sid]) for sid in sids], config)
    [entry] = [o for o in json.loads((tmp_path / "results" / "in0.json").read_text())["outputs"] if o["kind"] == "tar"]
    assert entry["sha256"] == hashlib.sha256((tmp_path / "shards" / "00000.tar").read_bytes()).hexdigest()
    assert entry["count"] == 1


def test_sizes_json_is_what_open_clip_reads(tmp_path):
    plan, _ = pack_parts(tmp_path, _inputs(), maxcount=10)
    path = write_sizes(pack_config(tmp_path), plan.outputs)
    assert json.loads(Path(path).read_text()) == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 5}


def test_part_writer_abort_leaves_no_file_and_a_part_is_a_valid_tar(tmp_path):
    writer = PartWriter(str(tmp_path / "x.tar"))
    writer.add(0, [("k.txt", b"1")])
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    writer = PartWriter(str(tmp_path / "p.tar"))
    writer.add(3, _members(3))
    part = writer.close(str(tmp_path / "p.index.parquet"), {})
    assert (tmp_path / "p.tar").read_bytes() == _tarfile_stream(_members(3))
    rows, sizes = read_index(str(tmp_path / "p.index.parquet"))
    assert list(rows) == [3] and list(sizes) == [part["payload"]] == [len(sample_blob(_members(3)))]


@pytest.mark.parametrize(("index", "total", "name"), [(0, 1, "00000"), (12, 13, "00012"), (99_999, 100_000, "99999"),
                                                     (0, 100_001, "000000"), (100_000, 100_001, "100000")])
def test_names_have_five_digits_and_more_past_100000_shards(index, total, name):
    assert output_name(index, total) == name
