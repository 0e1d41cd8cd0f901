"""Bounds on what the tar reader holds in memory, decided from headers before any byte they announce is read.

A tar header declares its member's size; a gzip layer turns a few MB of input into GBs of member. The reader
therefore checks each member's declared size against a bound for its kind and skips members over it in pieces
(`tar_plain.ForwardReader.seek`, tarfile's own stream seek), recording them as `member_too_large`. Header data
that tarfile would read whole (PAX extended headers, GNU long names and links, sparse maps) is bounded too: over
the bound, the shard ends as `shard_corrupt`, since nothing after such a header can be trusted.

The bounds follow the settings that already decide what a usable sample is:

* ``.txt`` and ``.json`` members: `TEXT_SLACK` times ``reader.max_caption_bytes`` (4 MiB by default). A caption
  somewhat over ``max_caption_bytes`` is still read and recorded as ``caption_too_long`` with its size; only one
  far beyond any caption is skipped unread. The ``.json`` metadata of a sample is a record of about a caption's
  size (url, caption, sizes, status), so it gets the same bound instead of a setting of its own.
* image members (``.jpg``, ``.jpeg``, ``.png``, ``.webp``): `IMAGE_BYTES_PER_PIXEL` bytes for each pixel that
  ``reader.max_image_pixels`` allows, plus `IMAGE_METADATA_BYTES` for EXIF, ICC and XMP: more than an encoded
  8-bit RGBA image stored without compression.
* any other member, and the header data of one member: ``reader.max_member_bytes``.
"""

from __future__ import annotations

import contextlib
import tarfile
from dataclasses import dataclass
from typing import IO, Iterator

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.shards import CAPTION_EXTENSION, IMAGE_EXTENSIONS, META_EXTENSION, ReadIssue, printable

TEXT_SLACK = 256
IMAGE_BYTES_PER_PIXEL = 4
IMAGE_METADATA_BYTES = 1 << 20
# header blocks around one member's header data: its own block, the block its data is padded to, the member's
HEADER_BLOCKS = 3 * tarfile.BLOCKSIZE


@dataclass(frozen=True)
class MemberBounds:
    """The largest declared size the reader reads, per member kind (see the module docstring)."""

    text: int
    image: int
    other: int

    @classmethod
    def from_config(cls, config: ReaderConfig) -> "MemberBounds":
        image = IMAGE_BYTES_PER_PIXEL * config.max_image_pixels + IMAGE_METADATA_BYTES
        return cls(TEXT_SLACK * config.max_caption_bytes, image, config.max_member_bytes)

    def limit(self, extension: str) -> tuple[int, str]:
        """The bound for members with this (lowercased) extension, and where it comes from, for the detail."""
        if extension in (CAPTION_EXTENSION, META_EXTENSION):
            return self.text, f"{TEXT_SLACK} x reader.max_caption_bytes"
        if extension in IMAGE_EXTENSIONS:
            return self.image, f"{IMAGE_BYTES_PER_PIXEL} bytes per pixel of reader.max_image_pixels + 1 MiB"
        return self.other, "reader.max_member_bytes"

    def issue(self, shard: str, key: str, extension: str, name: str, size: int) -> ReadIssue | None:
        """A `member_too_large` issue when the member's declared size is over its bound, else None."""
        bound, source = self.limit(extension)
        if size <= bound:
            return None
        detail = f"{name!r} declares {size} bytes, over the {bound} allowed ({source}); never read"
        return ReadIssue(shard, printable(key), "member_too_large", detail)


class _HeaderBudget:
    """tarfile's stream while it reads one member's headers: a read that would take the header bytes read so
    far over the budget raises instead of reading (tarfile asks for a PAX header's or long name's whole size in
    one read, and follows sparse maps and chains of such headers block by block)."""

    def __init__(self, raw: IO[bytes], bound: int) -> None:
        self.raw, self.bound, self.left = raw, bound, bound + HEADER_BLOCKS

    def read(self, size: int) -> bytes:
        if size > self.left:
            raise tarfile.ReadError(f"tar header data (PAX, GNU long name or sparse map) of more than {self.bound} "
                                    "bytes (reader.max_member_bytes)")
        self.left -= size
        return self.raw.read(size)

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, pos: int) -> int:
        return self.raw.seek(pos)

    def __getattr__(self, name: str) -> object:  # anything else tarfile may use: the stream's own
        return getattr(self.raw, name)


@contextlib.contextmanager
def header_budget(tar: tarfile.TarFile, bound: int | None) -> Iterator[None]:
    """Bound the bytes tarfile reads for one member's headers (nested header reads share the outer budget)."""
    if bound is None or isinstance(tar.fileobj, _HeaderBudget):
        yield
        return
    raw = tar.fileobj
    tar.fileobj = _HeaderBudget(raw, bound)
    try:
        yield
    finally:
        tar.fileobj = raw
