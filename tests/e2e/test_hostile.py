"""A whole run over a hostile shard corpus (issue 6): the run finishes, every unusable sample is one error row
with its specific reason, damaged shards report how far reading got, counts reconcile in manifest.json, and
nothing is written outside the output folder.

Every usable sample is kept (threshold below any score) so the error rows are exactly the hostile ones and the
cleaned shards can be checked member by member against the input bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from conftest import header_offsets, image_bytes, tar_bytes, tiny_config
from bicro_clean.pipeline.manifest_shards import read_manifest
from bicro_clean.pipeline.run import run_pipeline
from bicro_clean.pipeline.write import SHARD_REASONS
from bicro_clean.pipeline.shards import split_key, unsafe_name_problem



# ---------------------------------------------------------------- hostile bytes


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk, so headers can claim what PIL would never write."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _bomb() -> bytes:
    """A PNG whose header claims 40000x40000 pixels and holds none: decoding it would need 4.8 GB."""
    return _png(40000, 40000, 8, 2, b"")


def _rgb16() -> bytes:
    rows = b"".join(b"\0" + struct.pack(">HHH", 65535, 32768, 0) * 8 for _ in range(4))
    return _png(8, 4, 16, 2, rows)


def _grey16() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 12), 40000, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), color) for color in ((0, 200, 0), (200, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def _noise_jpeg(seed: int) -> bytes:
    """A distinct, poorly compressible image per sample: every good pair differs, gzip output is not tiny."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _good(key: str, seed: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", _noise_jpeg(seed)), (f"{key}.txt", f"photo {seed} of thing {seed % 7}".encode()),
            (f"{key}.json", json.dumps({"url": f"http://example.com/{seed}.jpg"}).encode())]


def _goods(prefix: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in _good(f"{prefix}{i}", seed + i)]


def _non_utf8_name(members: list[tuple[str, bytes]]) -> bytes:
    """tar bytes with one member name that is not UTF-8 (b'latin\\xe9name.jpg'): conftest writes only str names."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# ---------------------------------------------------------------- the corpus


def _mixed() -> tuple[bytes, dict[str, str], set[str]]:
    """One intact shard holding every per-sample and per-member hostile kind between good samples."""
    jpeg, caption = _noise_jpeg(1000), b"a caption"
    bad = {  # key -> (members, expected reason)
        "html": ([("html.jpg", b"<html><body>404 Not Found</body></html>"), ("html.txt", caption)], "decode_error"),
        "zero": ([("zero.jpg", b""), ("zero.txt", caption)], "decode_error"),
        "bomb": ([("bomb.png", _bomb()), ("bomb.txt", caption)], "image_too_large"),
        "nocap": ([("nocap.jpg", jpeg)], "missing_caption"),
        "noimage": ([("noimage.txt", caption)], "missing_image"),
        "latin1": ([("latin1.jpg", jpeg), ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))], "caption_not_utf8"),
        "blank": ([("blank.jpg", jpeg), ("blank.txt", b" \t\r\n ")], "empty_caption"),
        "empty": ([("empty.jpg", jpeg), ("empty.txt", b"")], "empty_caption"),
        "huge": ([("huge.jpg", jpeg), ("huge.txt", b"word " * 209_716)], "caption_too_long"),  # 1 MB
        "notjson": ([("notjson.jpg", jpeg), ("notjson.txt", caption), ("notjson.json", b"{'url': nope")],
                    "invalid_json"),
        "nanjson": ([("nanjson.jpg", jpeg), ("nanjson.txt", caption), ("nanjson.json", b'{"w": NaN}')],
                    "invalid_json"),  # Python's json reads NaN, but it is not JSON and could not be written back
        "infjson": ([("infjson.jpg", jpeg), ("infjson.txt", caption), ("infjson.json", b'{"w": 1e999}')],
                    "invalid_json"),
        "../escape": ([("../escape.jpg", jpeg), ("../escape.txt", caption)], "unsafe_member_name"),
        "/etc/evil": ([("/etc/evil.jpg", jpeg), ("/etc/evil.txt", caption)], "unsafe_member_name"),
        "bell\x07\x1b[2J": ([("bell\x07\x1b[2J.jpg", jpeg), ("bell\x07\x1b[2J.txt", caption)], "unsafe_member_name"),
        "latin\\xe9name": ([("latin\udce9name.jpg", jpeg), ("latin\udce9name.txt", caption)], "unsafe_member_name"),
        # WebDataset keys end at the first dot of the file name: key "v1", extensions "2.jpg" and "2.txt"
        "v1": ([("v1.2.jpg", jpeg), ("v1.2.txt", caption)], "missing_image"),
    }
    usable = {  # decoded after conversion to RGB and kept: odd but valid images are not errors
        "cmyk": image_bytes("JPEG", mode="CMYK"), "grey16": _grey16(), "rgb16": _rgb16(),
        "gif": _animated("GIF"), "webp": _animated("WEBP"),
    }
    members = _good("dupe", 1) + _goods("m", 3, 10)
    # valid JSON spelling a lone surrogate: no UTF-8 form, so Arrow and the tar's JSON need care
    members += [("surrogate.jpg", _noise_jpeg(5)), ("surrogate.txt", b"odd url"),
                ("surrogate.json", b'{"url": "http://x/\\ud800"}')]
    for key, data in usable.items():
        members += [(f"{key}.{'jpg' if key == 'cmyk' else 'png'}", data), (f"{key}.txt", f"{key} image".encode())]
    for i, (group, _) in enumerate(bad.values()):
        members += group + _good(f"g{i}", 100 + i)  # good samples between the hostile ones
    members += [("dupe.jpg", _noise_jpeg(2)), ("dupe.txt", b"second dupe")]  # same key again in this shard
    members += _good("shared", 3) + _good("dir.with.dots/ok", 4)
    expected = {key: reason for key, (_, reason) in bad.items()} | {"dupe": "duplicate_key"}
    good = {"dupe", "shared", "dir.with.dots/ok", "surrogate", *usable, *(f"m{i}" for i in range(3)),
            *(f"g{i}" for i in range(len(bad)))}
    return _non_utf8_name(members), expected, good


def _cut() -> tuple[bytes, int]:
    """Six samples, cut in the middle of c3.jpg's data (a download that stopped)."""
    data = tar_bytes(_goods("c", 6, 200))
    return data[: header_offsets(data)["c3.jpg"] + 512 + 300], 3


def _corrupt() -> tuple[bytes, int]:
    """Six samples, the header of r3.txt overwritten: not an end of archive, a corrupt one."""
    data = bytearray(tar_bytes(_goods("r", 6, 300)))
    offset = header_offsets(bytes(data))["r3.txt"]
    data[offset:offset + 100] = b"\x13" * 100
    return bytes(data), 3


def _broken_gzip() -> bytes:
    """Twelve samples gzip-compressed, 64 bytes of the deflate stream overwritten at 70% of its length."""
    packed = bytearray(gzip.compress(tar_bytes(_goods("z", 12, 400)), compresslevel=6, mtime=0))
    middle = len(packed) * 7 // 10
    packed[middle:middle + 64] = b"\xff" * 64
    return bytes(packed)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile-shards")
    mixed, expected, good = _mixed()
    cut, cut_at = _cut()
    corrupt, corrupt_at = _corrupt()
    files = {"a-mixed.tar": mixed, "b-cut.tar": cut, "c-corrupt.tar": corrupt, "d-broken.tar.gz": _broken_gzip(),
             "e-clean.tar": tar_bytes(_good("shared", 5) + _goods("e", 8, 500))}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {"root": root, "expected": expected, "good": good, "cut_at": cut_at, "corrupt_at": corrupt_at}


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> dict:
    """The whole pipeline with the working directory and Python's temp folder inside a watched parent."""
    from bicro_clean.models.encoders import _register_tiny_config

    _register_tiny_config()  # once per process, into the real temp folder: not this run's doing
    parent = tmp_path_factory.mktemp("hostile-run")
    out, scratch = parent / "out", parent / "scratch"
    scratch.mkdir()
    inputs_before = _tree(corpus["root"])
    config = tiny_config([str(corpus["root"] / "*.tar"), str(corpus["root"] / "*.tar.gz")], out,
                         select={"threshold": 0.0})  # soft_label >= 0: every row the rule sees is kept
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(parent)  # a stray relative write would land next to out/
        patch.setattr(tempfile, "tempdir", str(scratch))  # and scratch files must be cleaned up
        summary = run_pipeline(config)
    assert _tree(corpus["root"]) == inputs_before  # inputs are only read
    annotated = pl.read_parquet(str(out / "annotated" / "*.parquet"))
    manifest = read_manifest(str(out))  # manifest.json with its per-shard part
    return {"parent": parent, "out": out, "scratch": scratch, "summary": summary, "annotated": annotated,
            "manifest": manifest}


def _rows(annotated: pl.DataFrame, shard_name: str) -> pl.DataFrame:
    return annotated.filter(pl.col("shard").str.ends_with("/" + shard_name))


# ---------------------------------------------------------------- tests


def test_each_hostile_sample_is_one_error_row_with_its_reason(run, corpus):
    rows = _rows(run["annotated"], "a-mixed.tar")
    errors = rows.filter(pl.col("decision") == "error")
    assert Counter(zip(errors["key"], errors["reason"])) == Counter(corpus["expected"].items())
    assert errors["detail"].null_count() == 0 and errors["soft_label"].null_count() == errors.height
    usable = rows.filter(pl.col("decision") != "error")
    assert sorted(usable["key"]) == sorted(corpus["good"]) and set(usable["decision"]) == {"keep"}
    assert "first dot" in errors.filter(pl.col("key") == "v1")["detail"][0]  # the dotted key is explained
    assert usable.filter(pl.col("key") == "surrogate")["url"].to_list() == ["http://x/\\ud800"]
    dupe = rows.filter(pl.col("key") == "dupe").sort("decision")
    assert dupe["decision"].to_list() == ["error", "keep"] and dupe["caption"][1] == "photo 1 of thing 1"


def test_odd_but_valid_images_are_converted_and_kept(run):
    rows = _rows(run["annotated"], "a-mixed.tar").filter(pl.col("key").is_in(["cmyk", "grey16", "rgb16", "gif",
                                                                              "webp"]))
    sizes = {key: (w, h) for key, w, h in zip(rows["key"], rows["width"], rows["height"])}
    assert sizes == {"cmyk": (16, 16), "grey16": (12, 8), "rgb16": (8, 4), "gif": (16, 16), "webp": (16, 16)}
    assert set(rows["decision"]) == {"keep"} and rows["soft_label"].null_count() == 0


def test_damaged_shards_report_samples_read_and_lost(run, corpus):
    inputs = {Path(i["url"]).name: i for i in run["manifest"]["inputs"]}
    assert inputs["b-cut.tar"]["samples_read"] == corpus["cut_at"] and inputs["b-cut.tar"]["samples_lost"] == 1
    assert inputs["b-cut.tar"]["damage"]["reason"] == "shard_truncated"
    assert inputs["c-corrupt.tar"]["samples_read"] == corpus["corrupt_at"]
    assert inputs["c-corrupt.tar"]["samples_lost"] == 1
    assert inputs["c-corrupt.tar"]["damage"]["reason"] == "shard_corrupt"
    assert "3 samples read before the break" in inputs["c-corrupt.tar"]["damage"]["detail"]
    broken = inputs["d-broken.tar.gz"]
    assert broken["damage"]["reason"] == "shard_corrupt" and broken["samples_lost"] <= 1
    assert 0 < broken["samples_read"] < 12  # some samples come before the damage, not all of them
    for name in ("a-mixed.tar", "e-clean.tar"):
        assert inputs[name]["damage"] is None and inputs[name]["samples_lost"] == 0
    for name, expected_ok in (("b-cut.tar", 3), ("c-corrupt.tar", 3), ("d-broken.tar.gz", broken["samples_read"])):
        rows = _rows(run["annotated"], name)
        assert rows.filter(pl.col("decision") != "error").height == expected_ok
        keyed_loss = rows.filter((pl.col("key") != "") & pl.col("reason").is_in(list(SHARD_REASONS)))
        assert keyed_loss.height == inputs[name]["samples_lost"]
        assert rows["key"][-1] == "" and rows["reason"][-1] == inputs[name]["damage"]["reason"]


def test_counts_reconcile_in_the_manifest(run):
    manifest, annotated = run["manifest"], run["annotated"]
    counts = manifest["counts"]
    assert counts["in"] == annotated.height == run["summary"]["in"]
    assert counts["kept"] + counts["dropped"] + counts["errors"] == counts["in"] == sum(counts["by_reason"].values())
    by_reason = annotated.group_by("reason").len()
    assert dict(zip(by_reason["reason"], by_reason["len"])) == counts["by_reason"]
    assert counts["errors"] == annotated.filter(pl.col("decision") == "error").height
    per_input = [i["samples_read"] + i["samples_lost"] + (i["damage"] is not None) for i in manifest["inputs"]]
    assert sum(per_input) == counts["in"]
    for entry, rows in zip(manifest["inputs"], per_input):
        assert _rows(annotated, Path(entry["url"]).name).height == rows
    stats = [o for o in manifest["outputs"] if o["kind"] == "stats"]
    assert sum(o["count"] for o in stats) == counts["in"]
    assert sum(o["count"] for o in manifest["outputs"] if o["kind"] == "tar") == counts["kept"]


def test_nothing_is_written_outside_the_output_folder(run):
    out = run["out"].resolve()
    assert sorted(p.name for p in run["parent"].iterdir()) == ["out", "scratch"]
    assert list(run["scratch"].iterdir()) == []  # temp files were all removed
    for path in run["out"].rglob("*"):
        assert not path.is_symlink() and path.resolve().is_relative_to(out), path
    manifest = run["manifest"]
    named = [o["path"] for o in manifest["outputs"]] + [manifest["checkpoint"]["path"]]
    for rel in named:
        assert not Path(rel).is_absolute() and (out / rel).resolve().is_relative_to(out) and (out / rel).exists()
    for entry in manifest["outputs"]:
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def test_cleaned_shards_hold_kept_samples_byte_for_byte_under_safe_names(run, corpus):
    intact = ("a-mixed.tar", "e-clean.tar")  # the damaged ones cannot be listed by tarfile at all
    original = {(name, member): data for name in intact for member, data in _members(corpus["root"] / name).items()}
    written = {}
    for tar in sorted((run["out"] / "shards").glob("*.tar")):
        written.update(_members(tar))
    assert all(unsafe_name_problem(name) is None for name in written)
    kept = run["annotated"].filter(pl.col("decision") == "keep")
    assert len({split_key(name)[0] for name in written}) == kept.height
    checked = 0
    for row in kept.filter(pl.col("shard").str.contains("|".join(intact))).iter_rows(named=True):
        for name, data in written.items():
            key, extension = split_key(name)
            if key == row["output_key"] and extension != "json":
                assert data == original[(Path(row["shard"]).name, row["key"] + name[len(key):])], name
                checked += 1
    assert checked >= 2 * len(corpus["good"])  # image and caption of every kept sample of those shards
    assert json.loads(written["surrogate.json"])["url"] == "http://x/\ud800"  # written back, escaped
    shared = kept.filter(pl.col("key") == "shared")
    assert shared.height == 2 and shared["output_key"].n_unique() == 2  # renamed apart, both kept


def _members(path: Path) -> dict[str, bytes]:
    """Regular members of an intact tar, first occurrence of a name winning as in the reader (the hostile names
    here are only ever read, never extracted)."""
    members: dict[str, bytes] = {}
    with tarfile.open(path, errors="surrogateescape") as tar:
        for member in tar.getmembers():
            if member.isreg():
                members.setdefault(member.name, tar.extractfile(member).read())
    return members
