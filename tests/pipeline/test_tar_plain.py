"""The write stage's fast paths give tarfile's bytes and tarfile's reading exactly.

Writer: `tar_header`/`sample_blob`/`tar_end`, the write stage's parts and the packed shards against tarfile's own
stream-mode writer.
Reader: `iter_shard` with the plain-tar fast path (pipeline.tar_plain) against the same reader with the fast path
switched off (tarfile alone, mode "r|*"), on well-formed, odd and damaged tars: same samples, issues, reason codes
and byte offsets.
"""

from __future__ import annotations

import gzip
import io
import random
import shlex
import sys
import tarfile

import pytest

from bicro_clean.pipeline import tar_plain
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.shards import unsafe_name_problem
from bicro_clean.pipeline.tar_reader import _PLAIN_NAME, iter_shard
from bicro_clean.pipeline.writers import sample_blob, tar_end, tar_header, tar_info

from pack_fixture import pack_parts

NAMES = ["a.jpg", "0001/000000001.txt", "x" * 99 + ".j", "x" * 100, "x" * 101 + ".txt", "é.txt", "k\udcff.bin",
         "日本/語.json", "k\0.txt", ".hidden", ""]


def _tarfile_stream(members: list[tuple[str, bytes]]) -> bytes:
    """What the writer replaced: tarfile.open(mode="w|", format=PAX) with tar_info headers."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for name, data in members:
            tar.addfile(tar_info(name, len(data)), io.BytesIO(data))
    return buffer.getvalue()


# ---------------------------------------------------------------- writer


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 8**11 - 1, 8**11])
def test_tar_header_is_tarfiles_header(name, size):
    assert tar_header(name, size) == tar_info(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_sample_bytes_and_end_are_tarfiles_stream():
    rnd = random.Random(0)
    for _ in range(200):
        members = [(rnd.choice(NAMES[:-1]), rnd.randbytes(rnd.choice([0, 1, 511, 512, 513, 10_000])))
                   for _ in range(rnd.randint(0, 5))]
        blob = sample_blob(members)
        assert blob + tar_end(len(blob)) == _tarfile_stream(members)


def test_packed_shards_match_tarfile_tar_by_tar(tmp_path):
    samples = [[(f"k{i}.jpg", bytes([i]) * (i * 300)), (f"k{i}.json", b"{}")] for i in range(7)]
    # two input shards (4 + 3 samples) packed 3 to a shard: 00001.tar spans both parts
    _, stats = pack_parts(tmp_path, [[(m, "kept") for m in samples[:4]], [(m, "kept") for m in samples[4:]]],
                          maxcount=3)
    assert [s["successes"] for s in stats] == [3, 3, 1]
    for stat, group in zip(stats, (samples[0:3], samples[3:6], samples[6:])):
        expected = _tarfile_stream([m for members in group for m in members])
        assert (tmp_path / "shards" / f"{stat['shard']}.tar").read_bytes() == expected
        assert stat["bytes"] == len(expected)


def test_empty_output_tar_is_tarfiles_empty_archive(tmp_path):
    pack_parts(tmp_path, [[]])
    assert (tmp_path / "shards" / "00000.tar").read_bytes() == _tarfile_stream([])


# ---------------------------------------------------------------- reader


def _members(rnd: random.Random) -> list[tarfile.TarInfo | tuple[str, bytes]]:
    out: list[tarfile.TarInfo | tuple[str, bytes]] = []
    for i in range(rnd.randint(0, 6)):
        key = rnd.choice([f"{i:05d}", f"d/{i}", "x" * rnd.randint(95, 120), f"é{i}", f"../{i}", f".{i}", "dup"])
        for ext in rnd.sample(["jpg", "txt", "json", "TXT"], rnd.randint(1, 3)):
            kind = rnd.random()
            if kind < 0.05:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.type = rnd.choice([tarfile.DIRTYPE, tarfile.SYMTYPE])
                out.append(info)
            else:
                out.append((f"{key}.{ext}", rnd.randbytes(rnd.choice([0, 1, 100, 512, 1500, 10_240, 25_000]))))
    return out


def _tar(rnd: random.Random, fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for member in _members(rnd):
            info, data = (member, None) if isinstance(member, tarfile.TarInfo) else (tarfile.TarInfo(member[0]),
                                                                                   io.BytesIO(member[1]))
            if data is not None:
                info.size, info.mtime = len(member[1]), rnd.choice([0, 1_700_000_000])
            try:
                tar.addfile(info, data)
            except ValueError:  # a name the format cannot hold (ustar: over 100 characters, no place to split)
                continue
    return buffer.getvalue()


def _damage(rnd: random.Random, data: bytes) -> bytes:
    """Cut, flip bytes, corrupt a header field (with or without a fixed checksum), append junk, or gzip."""
    out, kind = bytearray(data), rnd.randrange(6)
    if kind == 1 and out:
        del out[rnd.randint(0, len(out)):]
    elif kind == 2 and out:
        for _ in range(rnd.randint(1, 3)):
            out[rnd.randrange(len(out))] = rnd.randrange(256)
    elif kind == 3 and len(out) >= 512:
        block = rnd.randrange(len(out) // 512) * 512
        start, end = rnd.choice([(100, 108), (124, 136), (136, 148), (148, 156), (156, 157), (345, 500), (0, 100)])
        out[block + rnd.randrange(start, end)] = rnd.choice(b" \0078+/a\x80\xff")
        if rnd.random() < 0.5:  # a valid checksum, so only the field itself is odd
            head = bytes(out[block:block + 512])
            out[block + 148:block + 156] = b"%06o\0 " % (256 + sum(head) - sum(head[148:156]))
    elif kind == 4:
        out += rnd.randbytes(rnd.randint(1, 700))
    elif kind == 5:
        out = bytearray(gzip.compress(bytes(out), mtime=0))
    return bytes(out)


def _read_all(path: str) -> list:
    return list(iter_shard(path, ReaderConfig()))


@pytest.mark.parametrize("seed", range(4))
def test_reader_fast_path_reports_what_tarfile_alone_reports(tmp_path, monkeypatch, seed):
    rnd = random.Random(seed)
    fast_members = 0
    counting = tar_plain.plain_member

    def count(tar, headers):
        nonlocal fast_members
        member = counting(tar, headers)
        fast_members += member is not None
        return member

    for trial in range(60):
        path = tmp_path / f"{trial}.tar"
        path.write_bytes(_damage(rnd, _tar(rnd, rnd.choice([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT,
                                                            tarfile.USTAR_FORMAT]))))
        with monkeypatch.context() as patch:
            patch.setattr("bicro_clean.pipeline.tar_reader.plain_member", count)
            fast = _read_all(str(path))
        with monkeypatch.context() as patch:
            patch.setattr(tar_plain, "_is_plain_tar", lambda head: False)  # tarfile's "r|*" for everything
            slow = _read_all(str(path))
        assert fast == slow, f"trial {trial}"
    assert fast_members > 50  # the fast path did the reading


def test_reader_fast_path_on_short_reads_of_a_pipe(tmp_path, monkeypatch):
    """A pipe hands over whatever it has: reads shorter than asked must not change what is reported."""
    rnd = random.Random(7)
    writer = "import sys; d = open(sys.argv[1], 'rb').read(); " \
             "[(sys.stdout.buffer.write(d[i:i + 777]), sys.stdout.flush()) for i in range(0, len(d), 777)]"
    for trial in range(8):
        path = tmp_path / f"{trial}.tar"
        path.write_bytes(_damage(rnd, _tar(rnd, tarfile.GNU_FORMAT)))
        url = f"pipe:{shlex.quote(sys.executable)} -c {shlex.quote(writer)} {shlex.quote(str(path))}"
        config = ReaderConfig(allow_pipe=True)
        fast = list(iter_shard(url, config))
        with monkeypatch.context() as patch:
            patch.setattr(tar_plain, "_is_plain_tar", lambda head: False)
            slow = list(iter_shard(url, config))
        assert fast == slow, f"trial {trial}"


def test_names_passed_without_a_look_are_safe():
    """The reader skips unsafe_name_problem for names matching _PLAIN_NAME: each such name must be safe."""
    rnd = random.Random(0)
    chars = "ab09_-./\\:é\x00\x1f \udcff"
    passed = 0
    for _ in range(50_000):
        name = "".join(rnd.choice(chars) for _ in range(rnd.randint(0, 8)))
        if _PLAIN_NAME.fullmatch(name):
            passed += 1
            assert unsafe_name_problem(name) is None, repr(name)
    assert passed > 1000
