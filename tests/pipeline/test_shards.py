"""Streaming shard reader: spec expansion, key grouping and one test per reason code."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import fsspec
import numpy as np
import pytest
from PIL import Image

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import decode_sample, read_shard
from bicro_clean.pipeline.shards import (
    REASONS,
    DecodedSample,
    RawSample,
    ReadIssue,
    UnsafeInputError,
    expand_shard_spec,
    shard_id,
    split_key,
)
from bicro_clean.pipeline.tar_reader import iter_shard

CONFIG = ReaderConfig()


def _read(path, config: ReaderConfig = CONFIG) -> list[DecodedSample | ReadIssue]:
    return list(read_shard(str(path), config))


def _reasons(items) -> dict[str, str]:
    """key -> reason of every issue (shard-level issues under key "")."""
    return {item.key: item.reason for item in items if isinstance(item, ReadIssue)}


def _ok_keys(items) -> list[str]:
    return [item.key for item in items if isinstance(item, DecodedSample)]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRCs) with no pixel data: a decompression-bomb stand-in."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ spec expansion


def test_brace_glob_and_list_expand_in_order(shards, good_sample):
    for i in range(3):
        shards.write(f"s-{i}.tar", good_sample("a"))
    shards.write("other/b.tar", good_sample("b"))
    root = shards.root
    assert list(expand_shard_spec(f"{root}/s-{{2..0}}.tar")) == [f"{root}/s-{i}.tar" for i in (2, 1, 0)]
    assert list(expand_shard_spec(f"{root}/s-*.tar")) == [f"{root}/s-{i}.tar" for i in range(3)]
    spec = [f"{root}/other/b.tar", f"{root}/s-[01].tar"]
    assert list(expand_shard_spec(spec)) == [f"{root}/other/b.tar", f"{root}/s-0.tar", f"{root}/s-1.tar"]
    assert list(expand_shard_spec(f"{root}/**/*.tar")) == sorted(str(p) for p in root.rglob("*.tar"))


def test_expansion_is_lazy_and_reports_patterns_matching_nothing(shards, good_sample):
    first = shards.write("a.tar", good_sample("a"))
    urls = expand_shard_spec([str(first), str(shards.root / "nothing-*.tar")])
    assert next(urls) == str(first)
    with pytest.raises(FileNotFoundError, match="nothing-"):
        next(urls)
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        list(expand_shard_spec(str(shards.root / "missing.tar")))
    with pytest.raises(FileNotFoundError):
        list(expand_shard_spec("memory://bicro-none/*.tar"))


def test_fsspec_urls_memory_glob_and_file_url(shards, good_sample):
    fs = fsspec.filesystem("memory")
    for name in ("b", "a"):
        fs.pipe(f"/bicro-test/{name}.tar", shards.tar_bytes(good_sample(name)))
    try:
        urls = list(expand_shard_spec("memory://bicro-test/*.tar"))
        assert urls == ["memory:///bicro-test/a.tar", "memory:///bicro-test/b.tar"]
        assert _ok_keys(_read(urls[1])) == ["b"]
    finally:
        fs.rm("/bicro-test", recursive=True)
    path = shards.write("c.tar", good_sample("c"))
    assert list(expand_shard_spec(f"file://{path}")) == [f"file://{path}"]
    assert _ok_keys(_read(f"file://{path}")) == ["c"]
    assert list(expand_shard_spec(f"file://{shards.root}/[c]*.tar")) == [f"file://{path}"]


def test_pipe_urls_are_refused_unless_allowed(shards, good_sample):
    path = shards.write("p.tar", good_sample("p"))
    with pytest.raises(UnsafeInputError):
        list(expand_shard_spec(f"pipe:cat {path}"))
    with pytest.raises(UnsafeInputError):
        list(iter_shard(f"pipe:cat {path}", CONFIG))
    assert list(expand_shard_spec(f"pipe:cat {path}", allow_pipe=True)) == [f"pipe:cat {path}"]
    assert _ok_keys(_read(f"pipe:cat {path}", ReaderConfig(allow_pipe=True))) == ["p"]


def test_shard_id_is_safe_deterministic_and_unique():
    first, second = shard_id("s3://bucket/a/00001.tar"), shard_id("s3://bucket/b/00001.tar")
    assert first.startswith("00001-") and second.startswith("00001-") and first != second
    assert shard_id("s3://bucket/a/00001.tar") == first
    assert shard_id("/data/x.tar.gz").startswith("x-") and shard_id("/data/x.tgz").startswith("x-")
    weird = shard_id("pipe:curl -s 'http://h/../a b?.tar'")
    assert all(c.isalnum() or c in "._-" for c in weird) and not weird.startswith(".")
    assert len(shard_id("")) == len("shard-") + 8


# ------------------------------------------------------------------------------------------------------ grouping


def test_key_is_everything_before_the_first_dot_of_the_base_name(shards, make_image):
    assert split_key("dir.v1/abc.def.JPG") == ("dir.v1/abc", "def.jpg")
    members = [("dir.v1/abc.jpg", make_image("JPEG")), ("dir.v1/abc.TXT", b" hello \n"),
               ("dir.v1/abc.extra.bin", b"\x00\x01"), ("x.y.jpg", make_image("JPEG")), ("x.y.txt", b"c")]
    items = _read(shards.write("dots.tar", members))
    sample = items[0]
    assert (sample.key, sample.caption) == ("dir.v1/abc", "hello")
    assert sample.raw.names == {"jpg": "dir.v1/abc.jpg", "txt": "dir.v1/abc.TXT", "extra.bin": "dir.v1/abc.extra.bin"}
    assert sample.raw.members["extra.bin"] == b"\x00\x01"
    assert _reasons(items) == {"x": "missing_image"}  # its extensions are y.jpg / y.txt


def test_image_priority_and_metadata(shards, make_image):
    red, blue = make_image("JPEG", color=(255, 0, 0)), make_image("PNG", color=(0, 0, 255))
    members = [("k.png", blue), ("k.jpg", red), ("k.txt", b"two images"), ("k.json", b'{"url": "http://x"}')]
    sample = _read(shards.write("prio.tar", members))[0]
    r, g, b = sample.image.getpixel((8, 8))
    assert r > 200 and b < 50  # the jpg wins over the png
    assert sample.meta == {"url": "http://x"} and sample.raw.members["png"] == blue


# --------------------------------------------------------------------------------------------- per-sample reasons


@pytest.fixture
def kitchen_sink(make_image) -> list:
    jpeg = make_image("JPEG")
    symlink = tarfile.TarInfo("link.jpg")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, "ok.jpg"
    directory = tarfile.TarInfo("somedir")
    directory.type = tarfile.DIRTYPE
    return [
        ("ok.jpg", jpeg), ("ok.txt", b"  a fine caption \n"), ("ok.json", b'{"n": 1}'),
        ("noimage.txt", b"caption only"),
        ("nocaption.jpg", jpeg),
        ("blank.jpg", jpeg), ("blank.txt", b" \t\n "),
        ("latin1.jpg", jpeg), ("latin1.txt", "caf\xe9".encode("latin-1")),
        ("long.jpg", jpeg), ("long.txt", b"x" * 65),
        ("html.jpg", b"<html><body>404 not found</body></html>"), ("html.txt", b"c"),
        ("empty.jpg", b""), ("empty.txt", b"c"),
        ("cut.jpg", jpeg[: len(jpeg) // 2]), ("cut.txt", b"c"),
        ("bomb.png", _png_header_only(40000, 40000)), ("bomb.txt", b"c"),
        ("badjson.jpg", jpeg), ("badjson.txt", b"c"), ("badjson.json", b"{not json"),
        ("listjson.jpg", jpeg), ("listjson.txt", b"c"), ("listjson.json", b"[1, 2]"),
        ("dup.jpg", jpeg), ("dup.txt", b"first"),
        ("between.jpg", jpeg), ("between.txt", b"c"),
        ("dup.jpg", jpeg), ("dup.txt", b"second"),
        ("twice.jpg", jpeg), ("twice.JPG", jpeg), ("twice.txt", b"c"),
        ("../evil.jpg", jpeg), ("/abs/evil.jpg", jpeg), ("ctl\x01.jpg", jpeg), ("a/../b.jpg", jpeg),
        (".hidden.jpg", jpeg),
        symlink, directory,
        ("last.jpg", jpeg), ("last.txt", b"the end"),
    ]


EXPECTED_SINK = {
    "noimage": "missing_image", "nocaption": "missing_caption", "blank": "empty_caption",
    "latin1": "caption_not_utf8", "long": "caption_too_long", "html": "decode_error", "empty": "decode_error",
    "cut": "decode_error", "bomb": "image_too_large", "badjson": "invalid_json", "listjson": "invalid_json",
    "dup": "duplicate_key", "twice": "duplicate_key", "../evil": "unsafe_member_name",
    "/abs/evil": "unsafe_member_name", "ctl\x01": "unsafe_member_name", "a/../b": "unsafe_member_name",
    ".hidden.jpg": "unsafe_member_name", "link": "non_file_member", "somedir": "non_file_member",
}


def test_every_sample_reason(shards, kitchen_sink):
    items = _read(shards.write("sink.tar", kitchen_sink), ReaderConfig(max_caption_bytes=64))
    assert _ok_keys(items) == ["ok", "dup", "between", "twice", "last"]
    assert _reasons(items) == EXPECTED_SINK
    ok = items[0]
    assert (ok.caption, ok.meta, ok.width, ok.height, ok.image.mode) == ("a fine caption", {"n": 1}, 16, 16, "RGB")
    first_dup = next(item for item in items if getattr(item, "key", "") == "dup")
    assert first_dup.caption == "first"  # the first occurrence is kept
    assert all(item.reason in REASONS and item.detail for item in items if isinstance(item, ReadIssue))


def test_every_member_group_is_accounted_for(shards, kitchen_sink):
    items = list(iter_shard(str(shards.write("sink.tar", kitchen_sink)), CONFIG))
    groups = []  # keys of consecutive runs of usable members, the way the reader groups them
    for member in kitchen_sink:
        name = member.name if isinstance(member, tarfile.TarInfo) else member[0]
        key = split_key(name)[0] or name
        if key not in EXPECTED_SINK or EXPECTED_SINK[key] not in ("unsafe_member_name", "non_file_member"):
            if not groups or groups[-1] != key:
                groups.append(key)
    member_issues = sum(reason in ("unsafe_member_name", "non_file_member") for reason in EXPECTED_SINK.values())
    within_group_duplicates = 1  # twice.JPG
    assert len(items) == len(groups) + member_issues + within_group_duplicates
    member_keys = {key for key, reason in EXPECTED_SINK.items() if reason in ("unsafe_member_name", "non_file_member")}
    assert {item.key for item in items} == set(groups) | member_keys
    raws = [item for item in items if isinstance(item, RawSample)]
    assert all(decode_sample(raw, CONFIG).key == raw.key for raw in raws)


def test_image_too_large_is_decided_from_the_header(shards, make_image):
    members = [("small.png", make_image("PNG")), ("small.txt", b"c"),
               ("claims.png", _png_header_only(3000, 3000)), ("claims.txt", b"c"),
               ("bomb.png", _png_header_only(40000, 40000)), ("bomb.txt", b"c")]
    path = shards.write("big.tar", members)
    strict = _reasons(_read(path, ReaderConfig(max_image_pixels=100)))
    assert strict == {"small": "image_too_large", "claims": "image_too_large", "bomb": "image_too_large"}
    # with a generous bound the header-only PNG is decoded and fails: the strict run never got that far
    generous = _reasons(_read(path, ReaderConfig(max_image_pixels=10**8)))
    assert generous == {"claims": "decode_error", "bomb": "image_too_large"}


def test_pil_bomb_bound_follows_the_config(shards):
    # 200M pixels is over PIL's default hard bound (2 x 89M): refused by default, decoded when the config allows
    members = [("wide.png", _png_header_only(20000, 10000)), ("wide.txt", b"c")]
    path = shards.write("wide.tar", members)
    assert _reasons(_read(path, ReaderConfig())) == {"wide": "image_too_large"}
    assert _reasons(_read(path, ReaderConfig(max_image_pixels=3 * 10**8))) == {"wide": "decode_error"}
    assert Image.MAX_IMAGE_PIXELS == 3 * 10**8


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), color) for color in ((0, 200, 0), (200, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def test_odd_image_modes_become_rgb(shards, make_image):
    grey16 = Image.fromarray(np.full((8, 12), 40000, dtype=np.uint16))
    buffer = io.BytesIO()
    grey16.save(buffer, format="PNG")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([10, 20, 200] * 256)
    palette_bytes = io.BytesIO()
    palette.save(palette_bytes, format="PNG", transparency=0)
    images = {
        "cmyk": make_image("JPEG", mode="CMYK"), "grey16": buffer.getvalue(), "palette": palette_bytes.getvalue(),
        "la": make_image("PNG", mode="LA", color=(90, 255)), "rgba": make_image("PNG", mode="RGBA"),
        "bilevel": make_image("PNG", mode="1", color=1), "grey": make_image("JPEG", mode="L"),
        "gif": _animated("GIF"), "webp": _animated("WEBP"),
    }
    members = []
    for key, data in images.items():
        members += [(f"{key}.png" if key != "cmyk" else f"{key}.jpg", data), (f"{key}.txt", b"c")]
    items = {item.key: item for item in _read(shards.write("modes.tar", members))}
    assert _reasons(items.values()) == {}
    assert all(item.image.mode == "RGB" for item in items.values())
    assert items["grey16"].image.getpixel((0, 0)) == (156, 156, 156)  # 40000/257, not clipped to white
    assert (items["grey16"].width, items["grey16"].height) == (12, 8)
    assert items["gif"].image.getpixel((4, 4))[1] > 150  # first (green) frame
    assert items["webp"].image.getpixel((4, 4))[1] > 150
    assert items["palette"].image.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white background


# ---------------------------------------------------------------------------------------------- shard-level breaks


def _three(shards, good_sample) -> bytes:
    return shards.tar_bytes(good_sample("s0") + good_sample("s1") + good_sample("s2"))


@pytest.mark.parametrize("where, extra", [("data", 100), ("header", 0), ("header", 100)])
def test_truncated_shard_keeps_what_was_read(shards, good_sample, where, extra):
    data = _three(shards, good_sample)
    offset = shards.header_offsets(data)["s1.jpg"] + (512 if where == "data" else 0) + extra
    items = _read(shards.write("cut.tar", data[:offset]))
    assert _ok_keys(items) == (["s0"] if where == "data" else [])
    expected = {"s1": "shard_truncated"} if where == "data" else {"s0": "shard_truncated"}
    assert _reasons(items) == {**expected, "": "shard_truncated"}
    assert isinstance(items[-1], ReadIssue) and items[-1].key == ""
    read_before = "1 samples read" if where == "data" else "0 samples read"
    assert read_before in items[-1].detail


def test_corrupt_header_in_the_middle_is_not_an_end_of_archive(shards, good_sample):
    data = bytearray(_three(shards, good_sample))
    offset = shards.header_offsets(bytes(data))["s1.txt"]
    data[offset : offset + 8] = b"garbage!"  # breaks the header checksum
    items = _read(shards.write("corrupt.tar", bytes(data)))
    assert _ok_keys(items) == ["s0"]
    assert _reasons(items) == {"s1": "shard_truncated", "": "shard_corrupt"}
    assert "1 samples read before the break" in items[-1].detail


def test_data_after_the_end_marker_is_reported(shards, good_sample):
    data = shards.tar_bytes(good_sample("a")) + shards.tar_bytes(good_sample("b"))  # concatenated tars
    items = _read(shards.write("concat.tar", data))
    assert _ok_keys(items) == ["a"] and _reasons(items) == {"": "shard_corrupt"}


def test_gzip_shards_good_truncated_and_corrupt(shards, good_sample):
    data = _three(shards, good_sample)
    good = shards.write("good.tar.gz", data, gzip_level=6)
    assert _ok_keys(_read(good)) == ["s0", "s1", "s2"]
    assert _ok_keys(_read(shards.write("good.tgz", data, gzip_level=6))) == ["s0", "s1", "s2"]
    packed = good.read_bytes()
    cut = _read(shards.write("cut.tar.gz", packed[: len(packed) * 2 // 3]))
    assert cut[-1].reason == "shard_truncated" and cut[-1].key == ""
    stored = shards.write("stored.tar.gz", data, gzip_level=0).read_bytes()  # stored blocks: a flip stays local
    broken = bytearray(stored)
    broken[len(broken) // 2] ^= 0xFF
    for name in ("broken.tar.gz", "broken.tgz"):  # the gzip layer checks the CRC at the end of the stream
        items = _read(shards.write(name, bytes(broken)))
        assert items[-1].key == "" and items[-1].reason == "shard_corrupt", items[-1]
    cut_tgz = _read(shards.write("cut.tgz", packed[: len(packed) // 2]))
    assert cut_tgz[-1].reason == "shard_truncated"


def test_whole_shard_failures(shards, tmp_path):
    missing = _read(tmp_path / "does-not-exist.tar")
    assert [(i.key, i.reason) for i in missing] == [("", "shard_unreadable")]
    assert [(i.key, i.reason) for i in _read(shards.write("zero.tar", b""))] == [("", "shard_truncated")]
    html = _read(shards.write("page.tar", b"<html>" + b"x" * 2000))
    assert [(i.key, i.reason) for i in html] == [("", "shard_corrupt")]
    assert _read(shards.write("empty.tar", [])) == []


def test_reading_is_streamed(shards, good_sample):
    data = _three(shards, good_sample)
    cut = shards.header_offsets(data)["s2.txt"] + 100
    stream = iter_shard(str(shards.write("cut.tar", data[:cut])), CONFIG)
    assert isinstance(next(stream), RawSample)  # yielded before the damage further on is even read
    assert [item.reason for item in stream if isinstance(item, ReadIssue)][-1] == "shard_truncated"


def test_reason_table_is_complete():
    codes = {"missing_image", "missing_caption", "empty_caption", "caption_not_utf8", "caption_too_long",
             "decode_error", "image_too_large", "invalid_json", "duplicate_key", "unsafe_member_name",
             "non_file_member", "shard_truncated", "shard_corrupt", "shard_unreadable", "member_too_large"}
    assert codes <= set(REASONS) and all(len(text) > 10 for text in REASONS.values())
