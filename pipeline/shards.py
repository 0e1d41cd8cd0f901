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
import json
import os
import re
import shlex
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
from braceexpand import braceexpand
from PIL import Image

from bicro_clean.pipeline.shard_names import canonical_url, shard_id, shard_ids  # noqa: F401 (re-exported)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in priority order when a sample has several
CAPTION_EXTENSION = "txt"
META_EXTENSION = "json"
# Image.open tries only these decoders: some others are dangerous on untrusted bytes (EPS runs Ghostscript).
SAFE_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

REASONS: dict[str, str] = {
    "missing_image": "The sample has no .jpg/.jpeg/.png/.webp member.",
    "missing_caption": "The sample has no .txt caption member.",
    "empty_caption": "The caption is empty, or has no visible character (only whitespace, control, zero-width "
    "or format characters, or combining marks).",
    "caption_not_utf8": "The caption bytes are not valid UTF-8.",
    "caption_too_long": "The caption is longer than reader.max_caption_bytes bytes.",
    "decode_error": "The image bytes cannot be decoded (not an image, HTML page, zero bytes, truncated file).",
    "image_too_large": "The image header declares more than reader.max_image_pixels pixels; it is never decoded.",
    "image_aspect_ratio": "The image's longer side is more than reader.max_aspect_ratio times its shorter side (a "
    "thin strip that resizing would blow up); it is never decoded.",
    "decode_timeout": "Decoding the image took longer than reader.max_decode_seconds.",
    "invalid_json": "The .json member is not a JSON object.",
    "duplicate_key": "The key (or a key + extension) already appeared in this shard; the first occurrence is kept.",
    "unsafe_member_name": "The member name is absolute, has a '..' component, control characters, invalid UTF-8 "
    "or no key; it is never used.",
    "non_file_member": "The tar member is a directory, link, device or FIFO, not a regular file; skipped.",
    "member_too_large": "A tar member's header declares more bytes than its kind's bound (.txt/.json: 256 x "
    "reader.max_caption_bytes; images: from reader.max_image_pixels; others: reader.max_member_bytes); it is "
    "skipped unread.",
    "shard_truncated": "The shard ends early (cut download, missing end marker); the samples before the cut are "
    "kept and the sample being read at the cut is recorded with this reason.",
    "shard_corrupt": "The shard has a corrupt tar header, compressed stream or trailing data; the samples before "
    "the damage are kept.",
    "shard_unreadable": "The shard cannot be opened (missing file, permissions, network, unknown protocol).",
}

_GLOB_CHARS = re.compile(r"[*?\[]")


class InputError(ValueError):
    """The shard spec names nothing usable (no match, a missing or unreadable file, an empty folder, unbalanced
    braces). Its message is one line naming the problem; it is raised while the spec is expanded, before any work,
    so the CLI prints it and exits 2 and a flow run fails with it as its message."""


class MissingInputError(InputError, FileNotFoundError):
    """A path, glob, brace range or folder of the spec matches no shard."""


class UnsafeInputError(InputError):
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
    url: str | None = None  # from the sample's .json when it was read and parses (best effort), for joins
    uid: str | None = None


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


def _reject_constant(name: str) -> float:
    # Python's json accepts NaN/Infinity, which are not JSON: a kept sample's JSON could not be written back
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999 parses to inf: the same problem as Infinity
        raise ValueError(f"number {text[:40]} is out of range")
    return value


MAX_JSON_DEPTH = 64  # far below Python's recursion limit, whatever the calling thread's stack already holds
_JSON_TOKENS = re.compile(rb'"(?:\\.|[^"\\])*"|[\[\]{}]')  # strings (skipped) and brackets


def _json_depth(data: bytes) -> int:
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:  # the common case, at C speed
        return 0
    depth = deepest = 0
    for token in _JSON_TOKENS.finditer(data):
        mark = token.group()
        if mark in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif mark in (b"]", b"}"):
            depth -= 1
    return deepest


def parse_meta(data: bytes) -> Any:
    """A .json member parsed strictly (no NaN/Infinity, finite numbers, at most MAX_JSON_DEPTH levels of nesting);
    raises ValueError. The depth is checked before parsing: json's recursion would otherwise fail or not depending
    on how deep the calling thread's stack already is, and a runner would change outputs."""
    depth = _json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested {depth} levels deep (> {MAX_JSON_DEPTH})")
    return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)


def sample_ids(members: dict[str, bytes]) -> tuple[str | None, str | None]:
    """(url, uid) from a member group's .json, best effort: None when it is absent, malformed or lacks them."""
    data = members.get(META_EXTENSION)
    if data is None:
        return None, None
    try:
        meta = parse_meta(data)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    url, uid = meta.get("url"), meta.get("uid")
    return (None if url is None else str(url)), (None if uid is None else str(uid))


# ---------------------------------------------------------------------------------------------------- shard specs


def expand_shard_spec(spec: str | list[str], allow_pipe: bool = False) -> Iterator[str]:
    """Lazily yield shard URLs: braces, then local or fsspec globs (sorted), in the order the spec gives them. A local
    folder means its ``*.tar`` files. Raises `InputError` (one line) when a part of the spec names nothing usable."""
    patterns = [spec] if isinstance(spec, str) else spec
    if not patterns:
        raise InputError("empty shard spec: give at least one path, glob, folder or URL")
    for pattern in patterns:
        expanded = _brace_expand(pattern)
        _check_range(pattern, expanded)
        for item in expanded:
            yield from _expand_pattern(item, allow_pipe)


def _brace_expand(pattern: str) -> list[str]:
    try:
        return list(braceexpand(pattern))
    except ValueError:  # braceexpand.UnbalancedBracesError
        raise InputError(f"shard spec {pattern!r} has unbalanced braces (a range is written "
                         "{00000..00099})") from None


def _is_local(pattern: str) -> bool:
    return not pattern.startswith("pipe:") and fsspec.core.split_protocol(pattern)[0] is None


def _check_range(pattern: str, expanded: list[str]) -> None:
    """A brace range whose members are missing: one error naming how many and the first, not the first alone."""
    if len(expanded) < 2:
        return
    literal = [os.path.expanduser(p) for p in expanded if _is_local(p) and not _GLOB_CHARS.search(p)]
    missing = [p for p in literal if not os.path.exists(p)]
    if missing:
        raise MissingInputError(f"{len(missing)} of the {len(expanded)} shards of {pattern!r} do not exist, the "
                                f"first {missing[0]!r}{_cwd_hint(missing[0])}")


def _cwd_hint(path: str) -> str:
    return "" if os.path.isabs(path) else f" (working directory {os.getcwd()})"


def _expand_pattern(pattern: str, allow_pipe: bool) -> Iterator[str]:
    if pattern.startswith("pipe:"):
        check_pipe_allowed(pattern, allow_pipe)
        yield pattern
    elif _is_local(pattern):
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


def _readable(path: str) -> bool:
    return os.access(path, os.R_OK)


def _checked(paths: list[str]) -> Iterator[str]:
    for path in paths:
        if not _readable(path):
            raise InputError(f"shard {path!r} is not readable (permission denied)")
        yield local_path(path)


def local_path(path: str) -> str:
    """A local file name in a spelling no reader takes for a pipe or URL: a name a glob or folder listing found
    (``pipe:rm -rf ~;x.tar``, ``http:x.tar``, ``a::b.tar``) is a file, never a command. A relative name with a colon
    gets ``./`` (the reader opens names starting with ``/`` or ``./`` as local files); others are left as they are,
    so their shard ids do not change."""
    if os.path.isabs(path) or ":" not in path or path.startswith("./"):
        return path
    return "./" + path


def _expand_local(pattern: str) -> Iterator[str]:
    if not _GLOB_CHARS.search(pattern):
        if os.path.isdir(pattern):  # img2dataset's output folder: its shards
            matches = sorted(p for p in glob.glob(os.path.join(glob.escape(pattern), "*.tar")) if os.path.isfile(p))
            if not matches:
                raise MissingInputError(_no_shards(pattern))
            yield from _checked(matches)
            return
        if not os.path.exists(pattern):
            braces = " (its braces were not expanded: a range is written {00000..00099})" if re.search(
                r"[{}]", pattern) else ""
            raise MissingInputError(f"shard {pattern!r} does not exist{_cwd_hint(pattern)}{braces}")
        yield from _checked([pattern])
        return
    matches = sorted(path for path in glob.glob(pattern, recursive=True) if not os.path.isdir(path))
    if not matches:
        raise MissingInputError(f"no shard matches {pattern!r}{_cwd_hint(pattern)}")
    yield from _checked(matches)


def _has_images(folder: str) -> bool:
    """Whether the folder holds an image file (the first one found ends the listing); False when unlistable."""
    suffixes = tuple(f".{x}" for x in IMAGE_EXTENSIONS)
    try:
        with os.scandir(folder) as entries:
            return any(e.name.lower().endswith(suffixes) and e.is_file() for e in entries)
    except OSError:  # unreadable: the plain "no shards" message, never a traceback
        return False


def _no_shards(folder: str) -> str:
    """Why a folder is no input. A folder of images (or make-shards' layout: images/ + captions.csv) is the
    commonest: the message gives the command that makes shards of it."""
    images = os.path.join(folder, "images") if os.path.isdir(os.path.join(folder, "images")) else folder
    if not _has_images(images):
        return f"folder {folder!r} has no *.tar shards{_cwd_hint(folder)}"
    near = [os.path.join(f, "captions.csv") for f in (images, os.path.dirname(os.path.normpath(images)) or ".")]
    captions = next((c for c in near if os.path.isfile(c)), "CAPTIONS.csv")
    return (f"{folder!r} is a folder of images, not WebDataset shards; make shards first: bicro-clean make-shards "
            f"--images {shlex.quote(images)} --captions {shlex.quote(captions)} --out SHARDS, then --input SHARDS")


def _expand_remote_glob(pattern: str) -> Iterator[str]:
    # keep any chained prefix ("simplecache::") on the results; only the last URL of a chain is globbed
    head, sep, url = pattern.rpartition("::")
    try:
        fs, path = fsspec.core.url_to_fs(url)
        found = fs.glob(path, detail=True)  # detail gives the type without one extra request per match
    except (ImportError, OSError, ValueError) as error:  # unknown protocol, missing backend, no access
        raise InputError(f"cannot list {pattern!r}: {describe_error(error)}".replace("\n", " ")) from None
    matches = sorted(name for name, info in found.items() if info.get("type") != "directory")
    if not matches:
        raise MissingInputError(f"no shard matches {pattern!r}")
    for match in matches:
        yield head + sep + fs.unstrip_protocol(match)


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
