"""Streaming reader for img2dataset-style WebDataset shards (``KEY.jpg`` + ``KEY.txt`` + optional ``KEY.json``).

Web-crawled shards are untrusted input: members can be cut off, headers corrupt, images undecodable or decompression
bombs, names can try to escape a directory. Nothing here is dropped silently: every member group becomes either a
`RawSample` or a `ReadIssue` with a reason code from `REASONS`, and shard-level damage ends that shard with one
issue that says how far reading got, so the caller can go on with the next shard.

Shards are streamed (`tarfile` pipe mode over an fsspec file), one member at a time: memory stays bounded by one
sample, whatever the shard size.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import tarfile
import unicodedata
import warnings
from dataclasses import dataclass, field
from typing import IO, Generator, Iterator

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image

from bicro_clean.pipeline.config import ReaderConfig

logger = logging.getLogger(__name__)

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
_TRUNCATION_ERRORS = (EOFError, tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError)
_STOP_ATTR = "_bicro_header_error"
_CHUNK = 1 << 16


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


def _member_kind(info: tarfile.TarInfo) -> str:
    kinds = [(info.isdir, "directory"), (info.issym, "symbolic link"), (info.islnk, "hard link"),
             (info.ischr, "character device"), (info.isblk, "block device"), (info.isfifo, "FIFO")]
    return next((kind for test, kind in kinds if test()), f"member of tar type {info.type!r}")


def printable(name: str) -> str:
    """A member name as storable text: tarfile keeps non-UTF-8 bytes as lone surrogates, which Arrow and JSON
    writers reject; they become backslash escapes (b"\\xff" -> "\\xff")."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _member_issue(shard: str, info: tarfile.TarInfo) -> ReadIssue | None:
    key = printable(split_key(info.name)[0] or info.name)  # "" is reserved for shard-level issues
    # non-files first: the "." entry of `tar -C dir .` is a directory, not an attack
    if not info.isreg():
        return ReadIssue(shard, key, "non_file_member", f"{info.name!r} is a {_member_kind(info)}")
    problem = unsafe_name_problem(info.name)
    if problem:
        return ReadIssue(shard, key, "unsafe_member_name", f"{info.name!r}: {problem}")
    return None


# ------------------------------------------------------------------------------------------------ tar streaming


class _WatchedTarInfo(tarfile.TarInfo):
    """A TarInfo that remembers why reading headers stopped.

    After the first member, tarfile treats a damaged or cut header as the end of the archive: without this, a
    corrupt shard would look complete and every sample after the damage would vanish silently.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as error:
            setattr(tar, _STOP_ATTR, error)
            raise


@dataclass
class _Group:
    key: str
    duplicate: bool  # the key was already emitted earlier in this shard
    members: dict[str, bytes] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    pending: str = ""  # member whose header was read but whose bytes are not in yet


class _Grouper:
    """Turns consecutive same-key members into samples and remembers emitted keys to catch duplicates."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.group: _Group | None = None
        self.seen: set[str] = set()
        self.emitted = 0

    def begin(self, name: str) -> list[RawSample | ReadIssue]:
        """A member header was read: close the previous group when the key changes."""
        key = split_key(name)[0]
        done = self.flush() if self.group is not None and self.group.key != key else []
        if self.group is None:
            self.group = _Group(key, duplicate=key in self.seen)
        self.group.pending = name
        return done

    def add(self, name: str, data: bytes) -> list[ReadIssue]:
        group = self.group
        extension = split_key(name)[1]
        group.pending = ""
        if extension in group.members:
            first = group.names[extension]
            detail = f"member {name!r} repeats {first!r}; first kept"
            return [ReadIssue(self.shard, group.key, "duplicate_key", detail)]
        group.members[extension] = data
        group.names[extension] = name
        return []

    def flush(self) -> list[RawSample | ReadIssue]:
        group, self.group = self.group, None
        if group is None:
            return []
        self.emitted += 1
        if group.duplicate:
            names = sorted(group.names.values())
            return [ReadIssue(self.shard, group.key, "duplicate_key", f"key seen earlier in the shard; {names} skipped")]
        self.seen.add(group.key)
        return [RawSample(self.shard, group.key, group.members, group.names)]

    def broken(self, error: BaseException, offset: int) -> list[ReadIssue]:
        """The shard broke: record the group in progress, then one shard-level issue; reading stops."""
        issues = []
        if self.group is not None:
            read = sorted(self.group.names.values())
            cut = f", cut while reading {self.group.pending!r}" if self.group.pending else ""
            detail = f"sample in progress when the shard broke (members read: {read}{cut})"
            issues.append(ReadIssue(self.shard, self.group.key, "shard_truncated", detail))
            self.group = None
        detail = f"{_describe(error)} near byte {offset}; {self.emitted} samples read before the break"
        issues.append(ReadIssue(self.shard, "", _classify(error), detail))
        logger.warning("%s: %s", self.shard, issues[-1].detail)
        return issues


def _describe(error: BaseException) -> str:
    # PIL names the BytesIO with its memory address; details must not change from run to run
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", f"{type(error).__name__}: {error}")


def _classify(error: BaseException) -> str:
    if isinstance(error, (FileNotFoundError, PermissionError)):  # lazy backends (http) fail at the first read
        return "shard_unreadable"
    # tarfile re-raises header errors as ReadError "from None"; the original is still the exception's context
    causes = (error, error.__context__)
    if any(isinstance(cause, _TRUNCATION_ERRORS) for cause in causes) or "unexpected end of data" in str(error):
        return "shard_truncated"
    return "shard_corrupt"


def _check_end_marker(tar: tarfile.TarFile) -> None:
    """Raise the header error that tarfile swallowed when iteration ended on anything but an end marker."""
    error = getattr(tar, _STOP_ATTR, None)
    if error is not None and not isinstance(error, tarfile.EOFHeaderError):
        raise error


def _trailing_data(tar: tarfile.TarFile) -> bool:
    while chunk := tar.fileobj.read(_CHUNK):
        if chunk.strip(b"\0"):
            return True
    return False


def _check_trailing_data(grouper: _Grouper, tar: tarfile.TarFile) -> Iterator[ReadIssue]:
    """Non-zero bytes after the end marker (concatenated tars) would otherwise be skipped silently.

    Reading to the end of the stream also makes a gzip layer verify its checksum."""
    try:
        if _trailing_data(tar):
            raise tarfile.ReadError("non-zero data after the end-of-archive marker (concatenated tars?)")
    except Exception as error:
        yield from grouper.broken(error, tar.offset)


def _next_header(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    info = tar.next()
    if info is None:
        _check_end_marker(tar)
    tar.members = []  # pipe mode would otherwise keep every TarInfo of the shard; we never look back
    return info


class _MemberIssues:
    """Member-level issues of consecutive members with one key and reason become one row: "../x.jpg" and
    "../x.txt" are one unusable sample, not two."""

    def __init__(self) -> None:
        self.pending: ReadIssue | None = None
        self.extra = 0  # members merged into `pending` after its first

    def add(self, issue: ReadIssue) -> list[ReadIssue]:
        held = self.pending
        if held is not None and (held.key, held.reason) == (issue.key, issue.reason):
            self.extra += 1
            return []
        done = self.flush()
        self.pending = issue
        return done

    def flush(self) -> list[ReadIssue]:
        held, extra, self.pending, self.extra = self.pending, self.extra, None, 0
        if held is None:
            return []
        more = f" (+{extra} more members of this key)" if extra else ""
        return [ReadIssue(held.shard, held.key, held.reason, held.detail + more)]


def _iter_members(grouper: _Grouper, tar: tarfile.TarFile) -> Generator[RawSample | ReadIssue, None, bool]:
    """Yield samples and issues; return True when the archive ended on a real end marker."""
    # Any exception while pulling bytes ends only this shard: the input is untrusted and remote backends raise
    # their own exception types. The try blocks wrap tarfile calls only, never our own logic or the yields.
    member_issues = _MemberIssues()
    while True:
        try:
            info = _next_header(tar)
        except Exception as error:
            yield from member_issues.flush()
            yield from grouper.broken(error, tar.offset)
            return False
        if info is None:
            break
        issue = _member_issue(grouper.shard, info)
        if issue is not None:
            yield from member_issues.add(issue)
            continue
        yield from member_issues.flush()
        yield from grouper.begin(info.name)
        try:
            data = tar.extractfile(info).read()
        except Exception as error:
            yield from grouper.broken(error, info.offset_data)
            return False
        yield from grouper.add(info.name, data)
    yield from member_issues.flush()
    yield from grouper.flush()  # a real end marker was read: the last group is complete
    return True


def _iter_stream(shard: str, stream: IO[bytes]) -> Iterator[RawSample | ReadIssue]:
    grouper = _Grouper(shard)
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedTarInfo, encoding="utf-8")
    except Exception as error:  # not a tar at all, empty, broken compression: same policy as mid-stream
        yield from grouper.broken(error, 0)
        return
    with contextlib.closing(tar):
        if (yield from _iter_members(grouper, tar)):
            yield from _check_trailing_data(grouper, tar)


@contextlib.contextmanager
def _pipe_stream(command: str) -> Iterator[IO[bytes]]:
    process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)  # explicitly allowed by allow_pipe
    try:
        yield process.stdout
    finally:
        process.stdout.close()
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if code != 0:
            logger.warning("pipe command %r exited with status %s", command[:80], code)


@contextlib.contextmanager
def _open_stream(url: str) -> Iterator[IO[bytes]]:
    if url.startswith("pipe:"):
        with _pipe_stream(url[len("pipe:"):]) as stream:
            yield stream
        return
    # fsspec does not know .tgz; tarfile's own gzip reader would skip the CRC check, so hand it to fsspec's
    compression = "gzip" if url.lower().endswith(".tgz") else "infer"
    with fsspec.open(url, "rb", compression=compression) as stream:
        yield stream


def iter_shard(url: str, config: ReaderConfig) -> Iterator[RawSample | ReadIssue]:
    """Stream one shard: a RawSample per key group, a ReadIssue for everything that cannot be used."""
    check_pipe_allowed(url, config.allow_pipe)
    with contextlib.ExitStack() as stack:
        try:
            stream = stack.enter_context(_open_stream(url))
        except (OSError, ValueError) as error:
            logger.warning("%s: cannot open: %s", url, _describe(error))
            yield ReadIssue(url, "", "shard_unreadable", _describe(error))
            return
        yield from _iter_stream(url, stream)


# ------------------------------------------------------------------------------------------------------ decoding


def _issue(raw: RawSample, reason: str, detail: str) -> ReadIssue:
    return ReadIssue(raw.shard, raw.key, reason, detail)


def _decode_caption(raw: RawSample, config: ReaderConfig) -> str | ReadIssue:
    data = raw.members.get(CAPTION_EXTENSION)
    if data is None:
        return _issue(raw, "missing_caption", f"members: {sorted(raw.names.values())}")
    if len(data) > config.max_caption_bytes:  # checked on bytes, before decoding a possibly huge string
        return _issue(raw, "caption_too_long", f"{len(data)} bytes > max_caption_bytes={config.max_caption_bytes}")
    try:
        text = data.decode("utf-8-sig")  # a BOM is an encoding marker, not caption text
    except UnicodeDecodeError as error:
        return _issue(raw, "caption_not_utf8", str(error))
    text = text.strip()
    return text if text else _issue(raw, "empty_caption", f"{len(data)} bytes of whitespace")


def _reject_constant(name: str) -> float:
    # Python's json accepts NaN/Infinity, which are not JSON: a kept sample's JSON could not be written back
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):  # 1e999 parses to inf: the same problem as Infinity
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _decode_meta(raw: RawSample) -> dict | ReadIssue:
    data = raw.members.get(META_EXTENSION)
    if data is None:
        return {}
    try:
        meta = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as error:  # RecursionError: absurdly nested arrays
        return _issue(raw, "invalid_json", _describe(error)[:300])
    if not isinstance(meta, dict):
        return _issue(raw, "invalid_json", f"top level is {type(meta).__name__}, not an object")
    return meta


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey ('I;16', 'I') scaled to 8 bits; PIL's own convert would clip everything above 255 to white."""
    values = np.asarray(image, dtype=np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _flatten(image: Image.Image) -> Image.Image:
    # transparent web images are drawn on white pages; dropping alpha instead would often give black
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    image.load()  # animated GIF/WebP: the first frame
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return _flatten(image)
    return image.convert("RGB")


def _decode_image(raw: RawSample, extension: str, config: ReaderConfig) -> tuple[Image.Image, int, int] | ReadIssue:
    # PIL's own bomb bound follows the config, so raising reader.max_image_pixels for a trusted source really
    # raises it (PIL would otherwise refuse > 2 x 89M pixels whatever the config says). One run, one config.
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    try:
        with warnings.catch_warnings():
            # our own bound decides below; PIL's warning fires at the same bound
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw.members[extension]), formats=SAFE_IMAGE_FORMATS) as image:
                width, height = image.size  # header only: no pixel is decoded before this check
                if width * height > config.max_image_pixels:
                    detail = f"header says {width}x{height} > max_image_pixels={config.max_image_pixels}"
                    return _issue(raw, "image_too_large", detail)
                return _to_rgb(image), width, height
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return _issue(raw, "image_too_large", _describe(error))
    except Exception as error:  # untrusted bytes: PIL raises OSError, SyntaxError, ValueError, struct.error...
        return _issue(raw, "decode_error", f"{raw.names[extension]!r}: {_describe(error)}"[:500])


def _dotted_key_hint(raw: RawSample) -> str:
    # "v1.2.jpg" is key "v1" with extension "2.jpg" (the WebDataset rule every loader applies), so the image
    # is there but under an extension no loader reads as an image: say so instead of a bare missing_image
    if any("." in ext and ext.rpartition(".")[2] in IMAGE_EXTENSIONS for ext in raw.members):
        return "; the file name has a dot after the key, so the key ends at the first dot of the file name"
    return ""


def decode_sample(raw: RawSample, config: ReaderConfig) -> DecodedSample | ReadIssue:
    """Check caption and metadata first (cheap), then decode the image to RGB."""
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in raw.members), None)
    if extension is None:
        return _issue(raw, "missing_image", f"members: {sorted(raw.names.values())}{_dotted_key_hint(raw)}")
    caption = _decode_caption(raw, config)
    meta = _decode_meta(raw)
    for result in (caption, meta):
        if isinstance(result, ReadIssue):
            return result
    decoded = _decode_image(raw, extension, config)
    if isinstance(decoded, ReadIssue):
        return decoded
    image, width, height = decoded
    return DecodedSample(raw.shard, raw.key, image, width, height, caption, meta, raw)


def read_shard(url: str, config: ReaderConfig) -> Iterator[DecodedSample | ReadIssue]:
    """`iter_shard` + `decode_sample`: one DecodedSample or ReadIssue per member group, in shard order."""
    for item in iter_shard(url, config):
        yield decode_sample(item, config) if isinstance(item, RawSample) else item
