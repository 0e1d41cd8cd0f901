"""Every tar member is bounded by the size its header declares (pipeline.tar_bounds): a member over its kind's
bound is one `member_too_large` row and is skipped in pieces, never held; header data tarfile would read whole
(PAX, GNU long name or link, sparse maps) over `reader.max_member_bytes` ends the shard as `shard_corrupt`.

The shards here are written piece by piece, so a 32 MiB member costs the test nothing either; tracemalloc then
shows what the reader itself allocated while reading them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import TINY_BICRO, image_bytes
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import read_shard
from bicro_clean.pipeline.shards import REASONS, ReadIssue
from bicro_clean.pipeline.tar_bounds import MemberBounds
from bicro_clean.pipeline.tar_reader import iter_shard

# bounds: .txt/.json 256 x 64 = 16 KiB; images 4 x 16 pixels + 1 MiB; anything else and header data 4 KiB
SMALL = ReaderConfig(max_caption_bytes=64, max_image_pixels=16, max_member_bytes=4096)
BIG = 32 << 20
JPEG = image_bytes("JPEG")
# plain tar (the fast path), .tar.gz (decompressed by fsspec, then the fast path), and gzip bytes under a .tar
# name (tarfile's own "r|*" stream and TarInfo headers)
LAYOUTS = {"plain": ("x.tar", False), "gzip": ("x.tar.gz", True), "tarfile-stream": ("x.tar", True)}
# What reading may allocate, whatever the member's size: the fast path's pieces; tarfile's stream decompresses a
# whole 10 KiB read at once, ~10 MB of output for bytes this compressible (deflate's 1:1032 at most)
PEAK = {"plain": 1 << 20, "gzip": 1 << 20, "tarfile-stream": 12 << 20}

Member = tuple[str, "bytes | int"]  # an int: that many bytes of b"a", written in pieces


def _write(path: Path, members: list[Member], compress: bool, fmt: int = tarfile.GNU_FORMAT) -> Path:
    """A tar written member by member; a member given as a size is streamed, never built in memory."""
    with (gzip.open(path, "wb", compresslevel=1) if compress else open(path, "wb")) as out:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = (data if isinstance(data, int) else len(data)), 0
            out.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
            if isinstance(data, int):
                piece = b"a" * (1 << 20)
                for start in range(0, data, len(piece)):
                    out.write(piece[:data - start])
            else:
                out.write(data)
            out.write(b"\0" * (-info.size % tarfile.BLOCKSIZE))
        out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return path


def _layout(tmp_path: Path, layout: str, members: list[Member], fmt: int = tarfile.GNU_FORMAT) -> str:
    name, compress = LAYOUTS[layout]
    return str(_write(tmp_path / name, members, compress, fmt))


def _rows(items: list) -> list[tuple[str, str]]:
    return [(item.key, item.reason if isinstance(item, ReadIssue) else "ok") for item in items]


def _read_traced(url: str, config: ReaderConfig) -> tuple[list, int]:
    tracemalloc.start()
    try:
        items = list(iter_shard(url, config))
        return items, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _sample(key: str, caption: bytes | int = b"a caption") -> list[Member]:
    return [(f"{key}.jpg", JPEG), (f"{key}.txt", caption)]


# ------------------------------------------------------------------------------------------- member bounds


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_oversized_caption_is_one_row_and_never_held(tmp_path, layout):
    members = [*_sample("a"), ("b.jpg", JPEG), ("b.txt", BIG), ("b.json", b'{"url": "http://x/b"}'),
               *_sample("c", b"caption c")]
    items, peak = _read_traced(_layout(tmp_path, layout, members), SMALL)
    assert _rows(items) == [("a", "ok"), ("b", "member_too_large"), ("c", "ok")]
    issue = items[1]
    assert f"'b.txt' declares {BIG} bytes, over the {256 * 64} allowed (256 x reader.max_caption_bytes)" in issue.detail
    assert "['b.jpg', 'b.json']" in issue.detail and "\n" not in issue.detail  # the rest of the sample, one line
    assert issue.url == "http://x/b"  # the .json before it was read: the row joins on url like any other
    assert items[2].members == {"jpg": JPEG, "txt": b"caption c"}  # grouping goes on after the skipped bytes
    assert peak < PEAK[layout], f"the reader allocated {peak} bytes for a {BIG}-byte member it skips"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_oversized_first_member_makes_its_sample_one_row(tmp_path, layout):
    members = [*_sample("a"), ("b.txt", BIG), ("b.jpg", JPEG), *_sample("c")]
    items = list(iter_shard(_layout(tmp_path, layout, members), SMALL))
    assert _rows(items) == [("a", "ok"), ("b", "member_too_large"), ("c", "ok")]
    assert "['b.jpg']" in items[1].detail


@pytest.mark.parametrize(("extension", "bound", "source"), [
    ("txt", 256 * 64, "256 x reader.max_caption_bytes"),
    ("json", 256 * 64, "256 x reader.max_caption_bytes"),
    ("png", 4 * 16 + (1 << 20), "4 bytes per pixel of reader.max_image_pixels + 1 MiB"),
    ("cls", 4096, "reader.max_member_bytes"),
])
def test_each_kind_of_member_has_its_bound(tmp_path, extension, bound, source):
    assert MemberBounds.from_config(SMALL).limit(extension) == (bound, source)
    members = [("at.jpg", JPEG), (f"at.{extension}", bound), ("over.jpg", JPEG), (f"over.{extension}", bound + 1)]
    items = list(iter_shard(_layout(tmp_path, "plain", members), SMALL))
    assert _rows(items) == [("at", "ok"), ("over", "member_too_large")]
    assert items[0].members[extension] == b"a" * bound  # at the bound: read, byte for byte
    assert items[1].reason in REASONS and source in items[1].detail


def test_default_bounds_leave_ordinary_captions_to_the_caption_check(tmp_path):
    """By default a 1 MB caption is still read and recorded as caption_too_long with its size (the hostile
    corpora's "huge" sample); only one over 4 MiB is skipped unread."""
    assert MemberBounds.from_config(ReaderConfig()).limit("txt")[0] == 4 << 20
    assert MemberBounds.from_config(ReaderConfig()).limit("cls")[0] == 16 << 20
    members = [*_sample("huge", b"word " * 209_716), *_sample("bomb", (4 << 20) + 1)]
    items = list(read_shard(_layout(tmp_path, "gzip", members), ReaderConfig()))
    assert _rows(items) == [("huge", "caption_too_long"), ("bomb", "member_too_large")]


# ------------------------------------------------------------------------------------------- header bounds


def _tar_bytes(members: list[tarfile.TarInfo | Member], fmt: int, end: bool = True) -> bytes:
    """The members as tarfile writes them; without the end-of-archive blocks when `end` is False."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            info = tarfile.TarInfo(member[0])
            info.size, info.mtime = len(member[1]), 0
            tar.addfile(info, io.BytesIO(member[1]))
        if not end:
            return buffer.getvalue()[:tar.offset]
    return buffer.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, 0
    return info


LONG_NAME = "d/" + "n" * 8000 + ".txt"  # a PAX path record or a GNU long-name member of about 8 KB
HEADERS = {
    "pax-path": ((LONG_NAME, b"x"), tarfile.PAX_FORMAT),
    "gnu-longname": ((LONG_NAME, b"x"), tarfile.GNU_FORMAT),
    "gnu-longlink": (_symlink("link.txt", "t" * 8000), tarfile.GNU_FORMAT),
}


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("header", HEADERS)
def test_header_data_over_the_bound_ends_the_shard(tmp_path, header, compress):
    member, fmt = HEADERS[header]
    data = _tar_bytes([*_sample("a"), *_sample("b"), member, *_sample("c")], fmt)
    path = tmp_path / ("x.tar.gz" if compress else "x.tar")
    path.write_bytes(gzip.compress(data) if compress else data)
    items = list(iter_shard(str(path), SMALL))
    # as after any corrupt header: samples before kept, the one in progress recorded, then the shard's row
    assert _rows(items) == [("a", "ok"), ("b", "shard_truncated"), ("", "shard_corrupt")]
    assert "tar header data (PAX, GNU long name or sparse map) of more than 4096 bytes" in items[-1].detail
    # within the bound (the default's 16 MiB) the same shard reads whole
    expected = {"pax-path": [("a", "ok"), ("b", "ok"), ("d/" + "n" * 8000, "missing_image"), ("c", "ok")],
                "gnu-longname": [("a", "ok"), ("b", "ok"), ("d/" + "n" * 8000, "missing_image"), ("c", "ok")],
                "gnu-longlink": [("a", "ok"), ("link", "non_file_member"), ("b", "ok"), ("c", "ok")]}[header]
    assert _rows(read_shard(str(path), ReaderConfig())) == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_oversized_first_header_is_never_read(tmp_path, layout):
    """tarfile reads the first header while it opens the archive: that one is bounded too, and not read whole."""
    data = _tar_bytes([("p" * BIG + ".txt", b"x"), *_sample("a")], tarfile.PAX_FORMAT)
    name, compress = LAYOUTS[layout]
    path = tmp_path / name
    path.write_bytes(gzip.compress(data, compresslevel=1) if compress else data)
    del data
    items, peak = _read_traced(str(path), SMALL)
    assert _rows(items) == [("", "shard_corrupt")] and "near byte 0; 0 samples read" in items[0].detail
    assert peak < PEAK[layout], f"the reader allocated {peak} bytes for a {BIG}-byte header it refuses"


def test_a_sparse_map_that_never_ends_is_bounded(tmp_path):
    """An old-GNU sparse member whose extension blocks each say "another follows": tarfile collects their entries
    block by block, as long as the stream goes on."""
    info = tarfile.TarInfo("s.txt")
    info.type, info.mtime = tarfile.GNUTYPE_SPARSE, 0
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[482] = 1  # isextended
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    extension = bytearray(tarfile.BLOCKSIZE)
    for i in range(21):
        extension[i * 24:(i + 1) * 24] = b"%011o\0%011o\0" % (i + 1, 1)
    extension[504] = 1
    data = _tar_bytes(_sample("a"), tarfile.GNU_FORMAT, end=False) + bytes(block) + bytes(extension) * 2000
    path = tmp_path / "sparse.tar"
    path.write_bytes(data + b"\0" * 1024)
    assert _rows(iter_shard(str(path), SMALL)) == [("a", "shard_truncated"), ("", "shard_corrupt")]


# ------------------------------------------------------------------------------------------- a whole run

BOMB = 64 << 20  # a caption member 16 times the default bound: 64 KB of gzip
RUN_BOUND = 1 << 20  # reader.max_member_bytes of the run below; its PAX header is twice that


def _good(key: str, seed: int) -> list[Member]:
    color = (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)
    return [(f"{key}.jpg", image_bytes("JPEG", color=color)), (f"{key}.txt", f"photo {seed} of thing".encode())]


@pytest.fixture(scope="module")
def bounded_runs(tmp_path_factory) -> dict:
    """A caption bomb in a plain and in a gzipped shard, a PAX header over the bound in a third; `bicro-clean run`
    under `--runner none` and the default runner (the Prefect flow), decode workers on."""
    root = tmp_path_factory.mktemp("bounded")
    (root / "in").mkdir()
    for name, compress in (("a", False), ("b", True)):
        members = [m for i in range(6) for m in _good(f"{name}{i}", i)]
        members += [(f"{name}bomb.jpg", JPEG), (f"{name}bomb.txt", BOMB), (f"{name}bomb.json", b'{"url": "u"}')]
        members += [m for i in range(6, 10) for m in _good(f"{name}{i}", i)]
        _write(root / "in" / ("a.tar" if name == "a" else "b.tar.gz"), members, compress)
    pax = [*(m for i in range(6) for m in _good(f"c{i}", 20 + i)), ("c6" + "n" * 2 * RUN_BOUND + ".txt", b"x")]
    (root / "in" / "c.tar").write_bytes(_tar_bytes(pax, tarfile.PAX_FORMAT))
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({"embed": {"encoder": "tiny", "batch_size": 8, "progress": False},
                                      "bicro": TINY_BICRO, "select": {"threshold": 0.0},
                                      "reader": {"max_member_bytes": RUN_BOUND}}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    runs = {}
    for runner, flags in (("none", ["--runner", "none"]), ("prefect", [])):
        out = root / f"out-{runner}"
        command = [str(Path(sys.executable).with_name("bicro-clean")), "run", "-c", str(config),
                   "--input", str(root / "in" / "*"), "--out", str(out), *flags]
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        runs[runner] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["none", "prefect"])
def test_a_run_records_the_bombs_and_keeps_everything_else(bounded_runs, runner):
    out = bounded_runs[runner]
    annotated = pl.read_parquet(str(out / "annotated" / "*.parquet"))
    rows = {(Path(shard).name, key): reason for shard, key, reason in
            zip(annotated["shard"], annotated["key"], annotated["reason"])}
    errors = {place: reason for place, reason in rows.items() if reason != "kept"}  # threshold 0: the rest kept
    assert errors == {("a.tar", "abomb"): "member_too_large", ("b.tar.gz", "bbomb"): "member_too_large",
                      ("c.tar", "c5"): "shard_truncated", ("c.tar", ""): "shard_corrupt"}
    assert len(rows) == annotated.height == 2 * 11 + 7  # one row per sample, one for the broken shard
    bomb = annotated.filter(pl.col("key") == "abomb")["detail"][0]
    assert f"'abomb.txt' declares {BOMB} bytes" in bomb and "['abomb.jpg', 'abomb.json']" in bomb
    corrupt = annotated.filter(pl.col("key") == "")["detail"][0]
    assert f"more than {RUN_BOUND} bytes (reader.max_member_bytes)" in corrupt and "5 samples read" in corrupt
    written = set()
    for path in (out / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            written.update(tar.getnames())
    # jpg, txt and the json the writer gives every kept sample, for the 25 kept ones; nothing of the bombs
    assert len(written) == 3 * (2 * 10 + 5) and not any("bomb" in name for name in written)


@pytest.mark.slow
def test_both_runners_write_the_same_bytes_around_the_bombs(bounded_runs):
    def hashes(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert hashes(bounded_runs["none"]) == hashes(bounded_runs["prefect"])
