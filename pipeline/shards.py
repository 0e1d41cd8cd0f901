"""Shard specs and sample identity for img2dataset-style WebDataset shards (``KEY.jpg`` + ``KEY.txt`` + optional
``KEY.json``): which shards a spec names, what a sample and an issue are, and which member names are safe to use.

Web-crawled shards are untrusted input: members can be cut off, headers corrupt, images undecodable or decompression
bombs, names can try to escape a directory. Nothing is dropped silently: every member group becomes either a
`RawSample` or a `ReadIssue` with a reason code from `REASONS`. The sample types, reason codes and name rules live
here, apart from the reading machinery, because every stage (embed, score, write, report) needs them.

Reading is split by concern: `bicro_clean.pipeline.tar_reader` streams a shard into raw member groups,
`bicro_clean.pipeline.decode` turns those into captions, metadata and RGB images.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterator

import fsspec
from braceexpand import braceexpand
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in priority order when a sample has several
CAPTION_EXTENSION = "txt"
META_EXTENSION = "json"
# Image.open tries only these decoders: some others are dangerous on untrusted bytes (EPS runs Ghostscript).
SAFE_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

REASONS: dict[str, str] = {
    "missing_image": "The sample has no .jpg/.jpeg/.png/.webp member.",
    "missing_caption": "The sample has no .txt caption member.",
    "empty_caption": "The caption is empty or only whitespace.",
    "caption_not_utf8": "The caption bytes are not valid UTF-8.",
    "caption_too_long": "The caption is longer than reader.max_caption_bytes bytes.",
    "decode_error": "The image bytes cannot be decoded (not an image, HTML page, zero bytes, truncated file).",
    "image_too_large": "The image header declares more than reader.max_image_pixels pixels; it is never decoded.",
    "invalid_json": "The .json member is not a JSON object.",
    "duplicate_key": "The key (or a key + extension) already appeared in this shard; the first occurrence is kept.",
    "unsafe_member_name": "The member name is absolute, has a '..' component, control characters, invalid UTF-8 "
    "or no key; it is never used.",
    "non_file_member": "The tar member is a directory, link, device or FIFO, not a regular file; skipped.",
    "shard_truncated": "The shard ends early (cut download, missing end marker); the samples before the cut are "
    "kept and the sample being read at the cut is recorded with this reason.",
    "shard_corrupt": "The shard has a corrupt tar header, compressed stream or trailing data; the samples before "
    "the damage are kept.",
    "shard_unreadable": "The shard cannot be opened (missing file, permissions, network, unknown protocol).",
}

_GLOB_CHARS = re.compile(r"[*?\[]")
_SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class UnsafeInputError(ValueError):
    """A `pipe:` shard URL (runs a shell command) while pipes are not allowed."""


@dataclass(frozen=True)
class RawSample:
    """A group of members with the same key, bytes untouched (copied byte-for-byte into cleaned shards)."""

    shard: str
    key: str
    members: dict[str, bytes]  # lowercased extension -> bytes
    names: dict[str, str]  # extension -> original member name inside the tar


@dataclass(frozen=True)
class ReadIssue:
    """A sample (or shard region, key "") that cannot be used: recorded, never dropped."""

    shard: str
    key: str
    reason: str
    detail: str


@dataclass
class DecodedSample:
    shard: str
    key: str
    image: Image.Image  # loaded, RGB
    width: int  # of the original image
    height: int
    caption: str  # stripped
    meta: dict
    raw: RawSample


def describe_error(error: BaseException) -> str:
    """An exception as `ReadIssue` detail text: type and message, stable from run to run."""
    # PIL names the BytesIO with its memory address; details must not change from run to run
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------------- shard specs


def expand_shard_spec(spec: str | list[str], allow_pipe: bool = False) -> Iterator[str]:
    """Lazily yield shard URLs: braces, then local or fsspec globs (sorted), in the order the spec gives them."""
    patterns = [spec] if isinstance(spec, str) else spec
    if not patterns:
        raise ValueError("empty shard spec: give at least one path, glob or URL")
    for pattern in patterns:
        for expanded in braceexpand(pattern):
            yield from _expand_pattern(expanded, allow_pipe)


def _expand_pattern(pattern: str, allow_pipe: bool) -> Iterator[str]:
    if pattern.startswith("pipe:"):
        check_pipe_allowed(pattern, allow_pipe)
        yield pattern
    elif fsspec.core.split_protocol(pattern)[0] is None:
        yield from _expand_local(os.path.expanduser(pattern))
    elif _GLOB_CHARS.search(pattern):
        yield from _expand_remote_glob(pattern)
    else:
        # a remote literal is not checked: one request per shard is too slow for 10k shards; a missing one
        # becomes a shard_unreadable issue when it is read
        yield pattern


def check_pipe_allowed(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise UnsafeInputError(
            f"refusing shard URL {url[:80]!r}: pipe: runs a shell command; set reader.allow_pipe to allow it"
        )


def _expand_local(pattern: str) -> Iterator[str]:
    if not _GLOB_CHARS.search(pattern):
        if not os.path.exists(pattern):
            raise FileNotFoundError(f"shard {pattern!r} does not exist (working directory {os.getcwd()})")
        yield pattern
        return
    matches = sorted(path for path in glob.glob(pattern, recursive=True) if not os.path.isdir(path))
    if not matches:
        raise FileNotFoundError(f"no shard matches {pattern!r} (working directory {os.getcwd()})")
    yield from matches


def _expand_remote_glob(pattern: str) -> Iterator[str]:
    # keep any chained prefix ("simplecache::") on the results; only the last URL of a chain is globbed
    head, sep, url = pattern.rpartition("::")
    fs, path = fsspec.core.url_to_fs(url)
    found = fs.glob(path, detail=True)  # detail gives the type without one extra request per match
    matches = sorted(name for name, info in found.items() if info.get("type") != "directory")
    if not matches:
        raise FileNotFoundError(f"no shard matches {pattern!r}")
    for match in matches:
        yield head + sep + fs.unstrip_protocol(match)


def shard_id(url: str) -> str:
    """Filesystem-safe, deterministic output stem for a shard, unique per URL: ``{stem}-{sha1(url)[:8]}``."""
    base = re.split(r"[/\\]", url.rstrip("/\\"))[-1]
    for suffix in _SHARD_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:80] or "shard"
    digest = hashlib.sha1(url.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{stem}-{digest}"


# ------------------------------------------------------------------------------------------------ member names


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = directory + base name up to its first dot; extension = the rest, lowercased."""
    directory, slash, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return directory + slash + stem, extension.lower()


def unsafe_name_problem(name: str) -> str | None:
    """Why a member name must never become an output path, or None when it is safe."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' path component"
    if any(unicodedata.category(char) == "Cc" for char in name):
        return "control character in the name"
    if any("\udc80" <= char <= "\udcff" for char in name):  # tarfile's surrogateescape for non-UTF-8 bytes
        return "name is not valid UTF-8"
    if not split_key(name)[0].rpartition("/")[2]:
        return "nothing before the first dot, so no key"
    return None


def printable(name: str) -> str:
    """A member name as storable text: tarfile keeps non-UTF-8 bytes as lone surrogates, which Arrow and JSON
    writers reject; they become backslash escapes (b"\\xff" -> "\\xff")."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
