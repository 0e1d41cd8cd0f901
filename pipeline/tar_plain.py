"""The reader's fast path for uncompressed tar streams: the same results as tarfile, at a fraction of its cost.

tarfile costs ~20 us a member (its _Stream's small reads, TarInfo.frombuf, an ExFileObject per member read): more
than all the rest of the write stage. For an uncompressed stream, `open_tar` hands tarfile a cheaper stream
(`ForwardReader`), and `plain_member` parses plain regular-file headers itself; any other header (PAX, GNU long
name, non-file, odd number field, signed checksum, damage) is left to TarFile.next from the very same state, so
what the reader reports (samples, issues, reason codes, byte offsets) is what tarfile alone would give. Compressed
streams go to tarfile's own "r|*" mode unchanged.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from types import SimpleNamespace
from typing import IO


@dataclass(slots=True)
class Member:
    """A member header as the reader needs it; `info` is tarfile's TarInfo, or None when `plain_member` parsed
    it (then it is a regular file)."""

    name: str
    size: int
    offset_data: int
    info: tarfile.TarInfo | None = None


class ForwardReader:
    """What tarfile's _Stream is for an uncompressed stream (read gives `size` bytes unless the stream ends, tell,
    forward-only seek that stops at the end), with a look-ahead for the fast path.

    The underlying stream is read exactly as _Stream reads it: pieces of tarfile.open's default buffer size, only
    when the buffer runs short. A decompressing stream (fsspec's gzip for .tgz) that is cut therefore fails on
    the same request, and the reader reports the same place, as with tarfile alone.
    """

    PIECE = tarfile.RECORDSIZE  # tarfile.open's bufsize

    def __init__(self, raw: IO[bytes], head: bytes) -> None:
        self._raw, self._buf, self._i, self._base = raw, head, 0, 0  # _base: stream offset of _buf[0]

    def tell(self) -> int:
        return self._base + self._i

    def _fill(self, need: int) -> int:
        """Buffer `need` bytes past the position (fewer only where the stream ends); returns how many."""
        have = len(self._buf) - self._i
        if have < need:
            parts = [self._buf[self._i:]]
            while have < need and (piece := self._raw.read(self.PIECE)):
                parts.append(piece)
                have += len(piece)
            self._base, self._buf, self._i = self._base + self._i, b"".join(parts), 0
        return min(have, need)

    def read(self, size: int) -> bytes:
        if len(self._buf) - self._i < size:
            self._fill(size)
        data = self._buf[self._i:self._i + size]
        self._i += len(data)
        return data

    def seek(self, pos: int) -> int:
        skip = pos - self.tell()
        if skip < 0:
            raise tarfile.StreamError("seeking backwards is not allowed")
        while skip and (n := self._fill(min(skip, self.PIECE))):  # in pieces: a skipped member is never held
            self._i, skip = self._i + n, skip - n
        return self.tell()

    def block_at(self, pos: int) -> bytes | None:
        """Move to `pos` (up to a piece ahead) and return the header block there, still unread: TarFile.next's
        advance plus a look at the block it reads next. None, and not moved, when the stream ends first."""
        skip = pos - self.tell()
        need = skip + tarfile.BLOCKSIZE
        if not 0 <= skip <= self.PIECE or (len(self._buf) - self._i < need and self._fill(need) < need):
            return None
        self._i += skip
        return self._buf[self._i:self._i + tarfile.BLOCKSIZE]

    def skip_block(self) -> int:
        """Consume the block `block_at` returned; returns the new position."""
        self._i += tarfile.BLOCKSIZE
        return self._base + self._i


_OCTAL = re.compile(rb"[0-7]*[ \0]*")  # a number field tarfile's nti reads as int(digits or "0", 8)


class PlainHeaders:
    """Parses a regular-file header block as TarInfo.frombuf would, or says None (then tarfile parses it).

    The block's slots that repeat from member to member in a shard (mode, ids, type, link, magic, user and group,
    devices) are checked by tarfile itself the first time they are seen; name, size, mtime and checksum are
    checked here: octal digits then padding only, and the unsigned checksum.
    """

    def __init__(self, encoding: str, errors: str) -> None:
        self.codec = (encoding, errors)
        self.accepted: set[tuple[bytes, bytes]] = set()  # static slots tarfile has parsed as a regular file

    def parse(self, block: bytes) -> tuple[str, int] | None:
        static = (block[100:124], block[156:345])
        if static not in self.accepted and not self._accept(block, static):
            return None
        size, mtime, chksum = block[124:136], block[136:148], block[148:156]
        if not (_OCTAL.fullmatch(size) and _OCTAL.fullmatch(mtime) and _OCTAL.fullmatch(chksum)):
            return None
        if int(chksum.rstrip(b" \0") or b"0", 8) != 256 + sum(block) - sum(chksum):
            return None
        name = block[:100].split(b"\0", 1)[0].decode(*self.codec)
        if block[345]:  # a ustar prefix
            name = block[345:500].split(b"\0", 1)[0].decode(*self.codec) + "/" + name
        return name, int(size.rstrip(b" \0") or b"0", 8)

    def _accept(self, block: bytes, static: tuple[bytes, bytes]) -> bool:
        try:
            info = tarfile.TarInfo.frombuf(block, *self.codec)
        except tarfile.HeaderError:
            return False
        if info.type != tarfile.REGTYPE:
            return False
        if len(self.accepted) >= 64:  # a shard whose every header differs must not grow this without bound
            self.accepted.clear()
        self.accepted.add(static)
        return True


def plain_member(tar: tarfile.TarFile, headers: PlainHeaders) -> Member | None:
    """The next member when its header is plain, with tarfile's state moved on exactly as TarFile.next would;
    None leaves the rest of the work, from the same state, to TarFile.next."""
    if tar.firstmember is not None or tar.pax_headers or tar.offset == 0:
        return None  # tarfile hands out its first member itself; global PAX headers change members
    block = tar.fileobj.block_at(tar.offset)
    parsed = headers.parse(block) if block is not None else None
    if parsed is None:
        return None
    name, size = parsed
    offset_data = tar.fileobj.skip_block()
    tar.offset = offset_data + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return Member(name, size, offset_data)


def member_data(tar: tarfile.TarFile, member: Member) -> bytes:
    """The member's bytes: tarfile's extractfile for what tarfile parsed, else what its _FileInFile would do (the
    header was the last thing read, so the data starts here). Read whole: the reader calls this only for members
    within their bound (pipeline.tar_bounds); one it skips is passed over in pieces by the next header's read."""
    if member.info is not None:
        return tar.extractfile(member.info).read()
    data = tar.fileobj.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _is_plain_tar(head: bytes) -> bool:
    """tarfile's own compression probe for mode "r|*" (the one it would run on these first bytes)."""
    try:
        return tarfile._StreamProxy.getcomptype(SimpleNamespace(buf=head)) == "tar"
    except (AttributeError, TypeError):  # a Python without this probe: tarfile does everything
        return False


class _Replay:
    """The stream with its first bytes (already read to probe) given back first."""

    def __init__(self, raw: IO[bytes], head: bytes) -> None:
        self.raw, self.head = raw, head

    def read(self, size: int) -> bytes:
        head, self.head = self.head, None
        return head if head is not None else self.raw.read(size)


def open_tar(stream: IO[bytes], tarinfo: type[tarfile.TarInfo]) -> tarfile.TarFile:
    """tarfile.open(fileobj=stream, mode="r|*", tarinfo=tarinfo, encoding="utf-8"), on a ForwardReader when
    the stream is not compressed."""
    head = stream.read(tarfile.BLOCKSIZE)  # what tarfile.open(mode="r|*") reads first, to probe
    if _is_plain_tar(head):
        return tarfile.TarFile(fileobj=ForwardReader(stream, head), mode="r", tarinfo=tarinfo,
                               encoding="utf-8")
    return tarfile.open(fileobj=_Replay(stream, head), mode="r|*", tarinfo=tarinfo, encoding="utf-8")
