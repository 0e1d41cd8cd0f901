"""Content identity of input shards: what makes sure every output describes the bytes that are in the input now.

Three layers, from cheap to certain:

- **Up-front identity** (`local_identity`, used by `parquet_io.shard_fingerprint`), read before anything is
  embedded, decides whether a shard's embeddings are reused. For a local uncompressed tar it is the file's size and
  mtime plus, for every member, its 512-byte header and the data blocks right after and right before it, read by
  seeking: names, sizes and member mtimes, every caption or JSON member up to 1 KiB whole, and the first and last
  bytes of each image. So a re-exported shard copied with `cp -p` (same size, same mtime) is seen as changed even
  when its writer gives every member a fixed mtime. A compressed local shard (gzip, bzip2, xz, zstd: no headers to
  seek to) adds its first and last 4 KiB, where those formats keep the checksum of everything they hold. HTTP(S)
  shards use the server's Last-Modified, ETag, Content-MD5 and Digest headers; object stores their ETag / MD5;
  a `pipe:` command has no identity but its spelling.
- **Stream digest** (`StreamTally`): the embed stage hashes each shard's bytes (compressed bytes for a compressed
  shard) as it streams them, with no second read, and records the SHA-256 in the embeddings Parquet metadata; it
  is part of the embeddings' cache key, so scores, the fit and the written outputs made from other bytes are
  redone.
- **Sample digests** (`sample_digest`): the embeddings record, per sample, a SHA-256 of its members (names and
  bytes). A stage that reads the input again (the write stage copying kept samples, the report cutting
  thumbnails) checks each sample it uses against it; on a mismatch it removes that shard's embeddings (so the
  next run embeds it again) and stops with `InputChangedError`: one line, never a mix of old scores and new bytes.

What only the last layer sees: a change that keeps a local tar's size, mtime and every member's header and outer
data blocks (an edit inside a large image), or any change behind an HTTP server that sends neither a new
Last-Modified nor an ETag, or behind a `pipe:`. A later stage that reads those samples stops the run; a rerun in
which every stage is cached reads only the report's gallery samples again, and cannot see a change elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from bicro_clean.pipeline.shards import InputError, RawSample

logger = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
_TAIL = 4096  # bytes read at each end of a compressed shard
_ZERO_BLOCK = bytes(BLOCK)
_OCTAL_FIELD = re.compile(rb" *([0-7]*)[ \0]*")  # what tarfile.nti accepts as an octal number
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


class InputChangedError(InputError):
    """An input shard's bytes differ from those its embeddings were made from. An InputError: the CLI prints its
    message as one line (`input error: input shard X changed since it was embedded; rerun`) and exits 2; the
    shard's embeddings are already removed, so running the same command again embeds it anew."""

    def __init__(self, shard: str) -> None:
        super().__init__(f"input shard {shard} changed since it was embedded; rerun")
        self.shard = shard

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (Dask, Ray) with its one argument
        return (type(self), (self.shard,))


# ------------------------------------------------------------------------------------------------ sample digests


def sample_digest(sample: RawSample) -> str:
    """SHA-256 of a sample's members: each member's original name, length and bytes, in extension order."""
    h = hashlib.sha256()
    for extension in sorted(sample.members):
        data = sample.members[extension]
        h.update(f"{sample.names.get(extension, extension)}\0{len(data)}\0".encode("utf-8", "surrogateescape"))
        h.update(data)
    return h.hexdigest()


class SampleCheck:
    """The digests a shard's embeddings recorded, checked against the samples a later stage reads again."""

    def __init__(self, shard: str, embeddings_path: str, required: bool = True) -> None:
        """`required`: a missing embeddings file means they were invalidated (or the shard never embedded): the
        write stage must not go on with scores whose embeddings are gone (a retried task would), the report may."""
        self.shard, self.embeddings_path = shard, embeddings_path
        self.digests = recorded_digests(embeddings_path)  # by row; empty: nothing recorded, nothing to check
        if self.digests is None:
            if required:
                raise InputChangedError(shard)
            self.digests = []
        self._by_key: dict[str, str] | None = None

    def verify_row(self, row: int, sample: RawSample) -> None:
        """Raise InputChangedError (after invalidating the embeddings) unless `sample`, read as row `row` of the
        shard, is what was embedded there."""
        expected = self.digests[row][1] if row < len(self.digests) else None
        if expected is not None and sample_digest(sample) != expected:
            raise self.changed(f"sample {sample.key!r}")

    def verify_key(self, sample: RawSample) -> None:
        """As verify_row, for a caller that finds samples by key (a RawSample's key is unique in its shard)."""
        if self._by_key is None:
            self._by_key = {key: digest for key, digest in self.digests if digest is not None}
        expected = self._by_key.get(sample.key)
        if expected is not None and sample_digest(sample) != expected:
            raise self.changed(f"sample {sample.key!r}")

    def changed(self, what: str) -> InputChangedError:
        return changed(self.shard, self.embeddings_path, what)


def recorded_digests(embeddings_path: str) -> list[tuple[str, str | None]] | None:
    """(key, sample_sha256) per row of an embeddings Parquet; [] when it has no such column (a synthetic file of
    the benchmarks); None when there is no readable file."""
    try:
        with fsspec.open(embeddings_path, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            if "sample_sha256" not in parquet.schema_arrow.names:
                return []
            table = parquet.read(columns=["key", "sample_sha256"])
    except (OSError, pa.ArrowInvalid) as error:
        logger.info("%s: no sample digests (%s)", embeddings_path, error)
        return None
    return list(zip(table["key"].to_pylist(), table["sample_sha256"].to_pylist()))


def changed(shard: str, embeddings_path: str, what: str) -> InputChangedError:
    """The error to raise for a changed input, after removing the shard's embeddings: a rerun then embeds its
    current bytes, and every later stage (whose keys derive from the embeddings') follows."""
    logger.info("%s: %s differs from what was embedded; removing %s", shard, what, embeddings_path)
    try:
        fs, _, (path,) = fsspec.get_fs_token_paths(embeddings_path)
        fs.rm(path)
    except FileNotFoundError:
        pass  # another task of this run found the same change first
    return InputChangedError(shard)


# ------------------------------------------------------------------------------------------------ stream digest


@dataclass
class StreamTally:
    """SHA-256 and count of the bytes of one shard as the reader pulls them from the source."""

    sha: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    at_end: bool = False  # the source said end of file: the digest covers the whole shard

    def wrap(self, raw: IO[bytes]) -> "_HashingReader":
        return _HashingReader(raw, self)

    def summary(self) -> dict[str, Any]:
        """What the embeddings metadata records under "input"."""
        return {"sha256": self.sha.hexdigest(), "bytes": self.size, "complete": self.at_end}


class _HashingReader:
    """A read-only stream that passes every byte it hands out through its tally (what tarfile and the
    decompressors call: read, readinto; no seeking)."""

    def __init__(self, raw: IO[bytes], tally: StreamTally) -> None:
        self._raw, self._tally = raw, tally
        self.closed = False

    def _count(self, data: bytes | memoryview, asked: int) -> None:
        if data:
            self._tally.sha.update(data)
            self._tally.size += len(data)
        elif asked != 0:
            self._tally.at_end = True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._count(data, size)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        buffer[:len(data)] = data
        self._count(data, len(buffer))
        return len(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True  # the source is closed by whoever opened it


# ------------------------------------------------------------------------------------------------ up-front identity


def local_file(url: str) -> str | None:
    """The local file a shard URL names, or None for pipes, URLs and remote stores."""
    if url.startswith("pipe:"):
        return None
    if url.startswith(("/", "./", "../")):  # as the reader opens it (shards.local_path): never a URL or chain
        return os.path.abspath(url)
    fs, _, (path,) = fsspec.get_fs_token_paths(url)
    return path if "file" in fs.protocol or "local" in fs.protocol else None


def local_identity(path: str) -> str:
    """SHA-256 over what the module docstring lists for a local shard, read by seeking (never the whole file)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = os.pread(fh.fileno(), BLOCK, 0)
            if head.startswith(_COMPRESSED_MAGIC):
                h.update(b"compressed")
                h.update(os.pread(fh.fileno(), _TAIL, 0))
                h.update(os.pread(fh.fileno(), _TAIL, max(0, size - _TAIL)))
            else:
                _walk_tar(fh.fileno(), size, h)
    except OSError as error:  # a FIFO, a file gone meanwhile: the size/mtime stamp is all there is
        logger.debug("%s: no member identity (%s)", path, error)
        return "unreadable"
    return h.hexdigest()


def _member_size(field: bytes) -> int | None:
    """A header's size field as tarfile reads it (octal digits, or GNU base-256), or None when it is no number."""
    if field[:1] and field[0] & 0x80:
        try:
            return tarfile.nti(field)
        except tarfile.InvalidHeaderError:
            return None
    match = _OCTAL_FIELD.fullmatch(field)
    return int(match.group(1) or b"0", 8) if match else None


def _walk_tar(fd: int, size: int, h: Any) -> None:
    """Hash each member's header with the data block after it and the block before it (the previous member's last
    data block), seeking from header to header; stops at the end marker, a block that is no header, or the end."""
    offset = members = 0
    while offset + BLOCK <= size:
        start = max(0, offset - BLOCK)
        window = os.pread(fd, offset + 2 * BLOCK - start, start)
        block = window[offset - start:offset - start + BLOCK]
        h.update(window)
        length = _member_size(block[124:136])
        if block == _ZERO_BLOCK or length is None or length < 0:
            break  # the end-of-archive marker, or damage: the reader reports it; the identity stops here
        members += 1
        offset += BLOCK + -(-length // BLOCK) * BLOCK
    h.update(f"members={members} end={offset} size={size}".encode())
