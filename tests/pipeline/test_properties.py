"""Property-based round trips (hypothesis): whatever valid sample goes into a tar comes out of the reader with
identical bytes and fields, and whatever goes into the cleaned-shard and Parquet writers comes back unchanged."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import tar_bytes
from pack_fixture import pack_parts
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import read_shard
from bicro_clean.pipeline.parquet_io import read_stage_metadata
from bicro_clean.pipeline.shards import DecodedSample, RawSample, shard_ids
from bicro_clean.pipeline.tar_reader import iter_shard
from bicro_clean.pipeline.writers import BICRO_JSON_KEY, sample_members, write_annotated, write_keep_keys

# Few examples, no deadline: each example writes and reads real files, and the suite runs on 2 shared cores.
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies

# Key characters: any printable text except what the reader refuses on purpose (control characters and
# surrogates: unsafe_member_name) and what ends or splits a key (".", "/", "\\"). ":" is left out because
# "c:x" reads as a Windows drive path, which the reader also refuses.
_KEY_CHARS = st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="./\\:")
_BASE = st.text(_KEY_CHARS, min_size=1, max_size=12).filter(lambda s: s not in ("..",))
_DIRECTORY = st.text(st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="/\\:"), min_size=1,
                     max_size=8).filter(lambda s: s not in (".", ".."))
_KEY = st.tuples(st.lists(_DIRECTORY, max_size=2), _BASE).map(lambda parts: "/".join([*parts[0], parts[1]]))

# A caption is any text with something visible left after stripping (a leading BOM is an encoding marker, not
# text; a letter, number, punctuation or symbol is visible: pipeline.decode)
_CAPTION = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=80).filter(
    lambda s: any(unicodedata.category(c)[0] in "LNPS" for c in s.removeprefix("\ufeff").strip()))
_JSON_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), st.text(max_size=12),
                        st.floats(allow_nan=False, allow_infinity=False))
# "bicro" is left out: the cleaned-shard writer puts its scores under that field, replacing any input value
_META = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "bicro"), _JSON_VALUE, max_size=4)
# extensions the reader does not interpret: kept byte for byte as extra members
_EXTRA_EXT = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=5).filter(
    lambda e: e not in ("jpg", "jpeg", "png", "webp", "txt", "json"))


@st.composite
def _images(draw) -> tuple[str, bytes, np.ndarray]:
    """(extension, encoded bytes, the pixels that were encoded) of a small valid PNG or JPEG."""
    height, width = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    mode = draw(st.sampled_from(["RGB", "L"]))
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    pixels = np.frombuffer(draw(st.binary(min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                           dtype=np.uint8).reshape(shape)
    extension = draw(st.sampled_from(["png", "jpg"]))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG" if extension == "png" else "JPEG")
    return extension, buffer.getvalue(), pixels


@st.composite
def _samples(draw) -> dict:
    """One valid sample: key, image, caption, optional JSON object, optional extra members (any case)."""
    key = draw(_KEY)
    extension, image, pixels = draw(_images())
    caption = draw(_CAPTION)
    members = [(f"{key}.{extension}", image), (f"{key}.txt", caption.encode("utf-8"))]
    meta = draw(st.none() | _META)
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta, ensure_ascii=draw(st.booleans())).encode("utf-8")))
    for ext in draw(st.lists(_EXTRA_EXT, max_size=2, unique=True)):
        name = f"{key}.{ext.upper() if draw(st.booleans()) else ext}.bin"
        members.append((name, draw(st.binary(max_size=64))))
    order = draw(st.permutations(members))  # member order inside a sample is free
    return {"key": key, "members": order, "caption": caption, "meta": meta or {}, "pixels": pixels,
            "extension": extension}


_SHARD = st.lists(_samples(), min_size=1, max_size=4, unique_by=lambda s: s["key"])


# ---------------------------------------------------------------- reader


def _write_tar(directory: str, members: list[tuple[str, bytes]]) -> str:
    path = str(Path(directory) / "shard.tar")
    Path(path).write_bytes(tar_bytes(members))
    return path


@SETTINGS
@given(_SHARD)
def test_reader_returns_every_valid_sample_with_identical_bytes(samples):
    with tempfile.TemporaryDirectory() as directory:
        path = _write_tar(directory, [m for s in samples for m in s["members"]])
        raws = list(iter_shard(path, ReaderConfig()))
        decoded = list(read_shard(path, ReaderConfig()))
    assert all(isinstance(r, RawSample) for r in raws) and [r.key for r in raws] == [s["key"] for s in samples]
    for raw, sample in zip(raws, samples):
        assert raw.members == {name[len(sample["key"]) + 1:].lower(): data for name, data in sample["members"]}
        assert sorted(raw.names.values()) == sorted(name for name, _ in sample["members"])
    assert all(isinstance(d, DecodedSample) for d in decoded), decoded
    for item, sample in zip(decoded, samples):
        assert item.caption == sample["caption"].removeprefix("\ufeff").strip()
        assert item.meta == sample["meta"]
        height, width = sample["pixels"].shape[:2]
        assert (item.width, item.height, item.image.mode) == (width, height, "RGB")
        if sample["extension"] == "png":  # lossless: the very pixels come back
            expected = Image.fromarray(sample["pixels"]).convert("RGB")
            assert np.array_equal(np.asarray(item.image), np.asarray(expected))


# ---------------------------------------------------------------- cleaned-shard writer

_SCORES = st.dictionaries(st.sampled_from(["p_clean", "soft_label", "consistency"]),
                          st.floats(0, 1, allow_nan=False), min_size=1)


@SETTINGS
@given(_SHARD, _SCORES, st.integers(1, 3), st.sampled_from([10**9, 2048]))
def test_cleaned_shard_writer_keeps_members_byte_for_byte(samples, scores, maxcount, maxsize):
    with tempfile.TemporaryDirectory() as directory:
        rows = []
        for sample in samples:
            members = dict((name[len(sample["key"]) + 1:].lower(), data) for name, data in sample["members"])
            names = {name[len(sample["key"]) + 1:].lower(): name for name, _ in sample["members"]}
            rows.append((sample_members(sample["key"], members, names, sample["key"], scores), "kept"))
        _, shards = pack_parts(Path(directory), [rows], maxcount, maxsize)  # written by a part, then packed
        paths = [str(Path(directory) / "shards" / f"{shard['shard']}.tar") for shard in shards]
        written = [_tar_members(path) for path in paths]
        read_back = [item for path in paths for item in iter_shard(path, ReaderConfig())]
    assert sum(s["successes"] for s in shards) == len(samples) and all(s["successes"] <= maxcount for s in shards)
    flat = [member for shard in written for member in shard]
    expected = [member for s in samples for member in _with_scores(s, scores)]
    assert [name for name, _ in flat] == [name for name, _ in expected]
    for (name, data), (_, want) in zip(flat, expected):
        if name.endswith(".json"):
            doc = json.loads(data)
            assert doc.pop(BICRO_JSON_KEY) == scores and doc == json.loads(want)
        else:
            assert data == want, name
    assert [raw.key for raw in read_back] == [s["key"] for s in samples]  # and the reader takes them back


def _with_scores(sample: dict, scores: dict) -> list[tuple[str, bytes]]:
    """The members a kept sample should have: its own, plus an (empty) JSON when it had none."""
    members = list(sample["members"])
    if not any(name == f"{sample['key']}.json" for name, _ in members):
        members.append((f"{sample['key']}.json", b"{}"))
    return members


def _tar_members(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


# ---------------------------------------------------------------- Parquet writers

_TEXT = st.none() | st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
_FLOAT = st.none() | st.floats(width=32, allow_nan=False)
_ROWS = st.lists(st.tuples(_TEXT, st.text(max_size=10), st.sampled_from(["keep", "drop", "error"]), _TEXT,
                           st.none() | st.integers(0, 2**31 - 1), _FLOAT), max_size=20)


def _annotated(rows: list[tuple]) -> pa.Table:
    shard, key, decision, caption, width, score = (list(column) for column in zip(*rows)) if rows \
        else ([], [], [], [], [], [])
    return pa.table({"shard": pa.array(shard, pa.string()), "key": pa.array(key, pa.string()),
                     "decision": pa.array(decision, pa.string()), "caption": pa.array(caption, pa.string()),
                     "width": pa.array(width, pa.int32()), "soft_label": pa.array(score, pa.float32())})


@SETTINGS
@given(_ROWS, _META)
def test_parquet_writers_return_every_value_unchanged(rows, meta):
    table = _annotated(rows)
    with tempfile.TemporaryDirectory() as directory:
        annotated, filtered, keys = (str(Path(directory) / name) for name in ("a.parquet", "f.parquet", "k.parquet"))
        write_annotated(table, annotated, filtered, meta)
        back, kept = pq.read_table(annotated), pq.read_table(filtered)
        assert read_stage_metadata(annotated) == meta
        assert write_keep_keys([filtered], keys) == kept.num_rows
        keep_keys = pq.read_table(keys)
    assert back.replace_schema_metadata(None).equals(table)
    expected_kept = [row for row in table.to_pylist() if row["decision"] == "keep"]
    assert kept.to_pylist() == expected_kept
    assert keep_keys.to_pylist() == [{"shard": r["shard"], "shard_id": shard_ids([r["shard"]])[0], "key": r["key"],
                                      "uid": None} for r in expected_kept]
