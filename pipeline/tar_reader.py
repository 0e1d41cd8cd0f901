"""Streaming tar reader: one shard in, one `RawSample` or `ReadIssue` per member group out, in shard order.

Shards are streamed (`tarfile` pipe mode over an fsspec file, an http(s) stream that resumes after a cut
connection (`bicro_clean.pipeline.http_read`), or the stdout of an allowed `pipe:` command; plain tars through
`bicro_clean.pipeline.tar_plain`, tarfile's results at a fraction of its cost), one member at a time:
memory stays bounded by one sample, whatever the shard size, and each member and header by the bound for its kind,
checked on the size its header declares before any of it is read (`bicro_clean.pipeline.tar_bounds`). Member bytes
are not decoded here (that is `bicro_clean.pipeline.decode`), so cleaned shards can copy them byte-for-byte.

Members are untrusted: non-files and unsafe names become issues, never paths. Shard-level damage (a cut download,
a corrupt header or compressed stream, data after the end marker) ends that shard with one issue that says how far
reading got, so the caller can go on with the next shard.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass, field
from typing import IO, ClassVar, Generator, Iterator

import fsspec
import fsspec.compression
from fsspec.implementations.local import LocalFileSystem

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.content_id import StreamTally
from bicro_clean.pipeline.http_read import ResumingHTTPReader, is_http
from bicro_clean.pipeline.shards import (
    RawSample,
    ReadIssue,
    check_pipe_allowed,
    describe_error,
    printable,
    sample_ids,
    split_key,
    unsafe_name_problem,
)
from bicro_clean.pipeline.tar_bounds import MemberBounds, header_budget
from bicro_clean.pipeline.tar_plain import ForwardReader, Member, PlainHeaders, member_data, open_tar, plain_member

logger = logging.getLogger(__name__)

_TRUNCATION_ERRORS = (EOFError, tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError)
_STOP_ATTR = "_bicro_header_error"
_CHUNK = 1 << 16
# Names that unsafe_name_problem passes without a look (no leading or lone dot, slash, colon, control or non-ASCII
# character): nearly every real member name; anything else gets the full check.
_PLAIN_NAME = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9_.-]*/)*[A-Za-z0-9_-][A-Za-z0-9_.-]*")


# ------------------------------------------------------------------------------------------------ member checks


def _member_kind(info: tarfile.TarInfo) -> str:
    kinds = [(info.isdir, "directory"), (info.issym, "symbolic link"), (info.islnk, "hard link"),
             (info.ischr, "character device"), (info.isblk, "block device"), (info.isfifo, "FIFO")]
    return next((kind for test, kind in kinds if test()), f"member of tar type {info.type!r}")


def _member_issue(shard: str, member: Member) -> ReadIssue | None:
    name, info = member.name, member.info
    # non-files first: the "." entry of `tar -C dir .` is a directory, not an attack
    if info is not None and not info.isreg():
        key = printable(split_key(name)[0] or name)  # "" is reserved for shard-level issues
        return ReadIssue(shard, key, "non_file_member", f"{name!r} is a {_member_kind(info)}")
    problem = None if _PLAIN_NAME.fullmatch(name) else unsafe_name_problem(name)
    if problem:
        key = printable(split_key(name)[0] or name)
        return ReadIssue(shard, key, "unsafe_member_name", f"{name!r}: {problem}")
    return None


# ------------------------------------------------------------------------------------------------ tar streaming


class _WatchedTarInfo(tarfile.TarInfo):
    """A TarInfo that remembers why reading headers stopped, and reads header data within `header_bound`.

    After the first member, tarfile treats a damaged or cut header as the end of the archive: without this, a
    corrupt shard would look complete and every sample after the damage would vanish silently. tarfile reads a
    PAX header or GNU long name whole, whatever size its header claims: over the bound, the read raises instead
    (`tar_bounds.header_budget`) and the shard ends as shard_corrupt.
    """

    header_bound: ClassVar[int | None] = None

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            with header_budget(tar, cls.header_bound):
                return super().fromtarfile(tar)
        except tarfile.HeaderError as error:
            setattr(tar, _STOP_ATTR, error)
            raise


@functools.lru_cache(maxsize=8)
def _tarinfo_class(header_bound: int) -> type[_WatchedTarInfo]:
    """A _WatchedTarInfo with this header bound (a class: tarfile reads the first header in its constructor)."""
    return type("_BoundedTarInfo", (_WatchedTarInfo,), {"header_bound": header_bound})


@dataclass
class _Group:
    key: str
    duplicate: bool  # the key was already emitted earlier in this shard
    members: dict[str, bytes] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    pending: str = ""  # member whose header was read but whose bytes are not in yet
    issue: ReadIssue | None = None  # a member of this key that cannot be used: the whole sample is one issue row


class _Grouper:
    """Turns consecutive same-key members into samples and remembers emitted keys to catch duplicates."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.group: _Group | None = None
        self.seen: set[str] = set()
        self.emitted = 0
        self.extension = ""  # of the member begun last

    def begin(self, name: str) -> list[RawSample | ReadIssue]:
        """A member header was read: close the previous group when the key changes."""
        key, self.extension = split_key(name)  # add() gets the same name next
        done = self.flush() if self.group is not None and self.group.key != key else []
        if self.group is None:
            self.group = _Group(key, duplicate=key in self.seen)
        self.group.pending = name
        return done

    def add(self, name: str, data: bytes) -> list[ReadIssue]:
        group, extension = self.group, self.extension
        group.pending = ""
        if extension in group.members:
            first = group.names[extension]
            detail = f"member {name!r} repeats {first!r}; first kept"
            return [ReadIssue(self.shard, group.key, "duplicate_key", detail, *sample_ids(group.members))]
        group.members[extension] = data
        group.names[extension] = name
        return []

    def attach(self, issue: ReadIssue) -> bool:
        """A link/device/unsafe member of the key being read makes the sample one issue row (not that row plus a
        missing_image row for the rest of it). False: the issue is not this group's."""
        if self.group is None or issue.key != printable(self.group.key):
            return False
        self.group.issue = self.group.issue or issue
        return True

    def flush(self) -> list[RawSample | ReadIssue]:
        group, self.group = self.group, None
        if group is None:
            return []
        self.emitted += 1
        if group.issue is not None:
            detail = f"{group.issue.detail}; the sample's other members {sorted(group.names.values())} skipped"
            return [ReadIssue(self.shard, group.key, group.issue.reason, detail, *sample_ids(group.members))]
        if group.duplicate:
            names = sorted(group.names.values())
            detail = f"key seen earlier in the shard; {names} skipped"
            return [ReadIssue(self.shard, group.key, "duplicate_key", detail, *sample_ids(group.members))]
        self.seen.add(group.key)
        return [RawSample(self.shard, group.key, group.members, group.names)]

    def broken(self, error: BaseException, offset: int) -> list[ReadIssue]:
        """The shard broke: record the group in progress, then one shard-level issue; reading stops."""
        issues = []
        if self.group is not None:
            read = sorted(self.group.names.values())
            cut = f", cut while reading {self.group.pending!r}" if self.group.pending else ""
            detail = f"sample in progress when the shard broke (members read: {read}{cut})"
            issues.append(ReadIssue(self.shard, self.group.key, "shard_truncated", detail,
                                    *sample_ids(self.group.members)))
            self.group = None
        detail = f"{describe_error(error)} near byte {offset}; {self.emitted} samples read before the break"
        issues.append(ReadIssue(self.shard, "", _classify(error), detail))
        logger.warning("%s: %s", self.shard, issues[-1].detail)
        return issues


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


def _next_member(tar: tarfile.TarFile, headers: PlainHeaders | None) -> Member | None:
    member = plain_member(tar, headers) if headers is not None else None
    if member is not None:
        return member
    info = _next_header(tar)
    return None if info is None else Member(info.name, info.size, info.offset_data, info)


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

    def take(self, key: str) -> ReadIssue | None:
        """The held issue when it belongs to `key` (the sample's regular members follow it), else None."""
        held = self.pending
        if held is None or held.key != printable(key):
            return None
        self.pending, self.extra = None, 0
        return held

    def flush(self) -> list[ReadIssue]:
        held, extra, self.pending, self.extra = self.pending, self.extra, None, 0
        if held is None:
            return []
        more = f" (+{extra} more members of this key)" if extra else ""
        return [ReadIssue(held.shard, held.key, held.reason, held.detail + more)]


def _iter_members(grouper: _Grouper, tar: tarfile.TarFile,
                  bounds: MemberBounds) -> Generator[RawSample | ReadIssue, None, bool]:
    """Yield samples and issues; return True when the archive ended on a real end marker."""
    # Any exception while pulling bytes ends only this shard: the input is untrusted and remote backends raise
    # their own exception types. The try blocks wrap the reading calls only (tarfile's, or the plain-tar path that
    # stands in for them), never the grouping logic or the yields.
    member_issues = _MemberIssues()
    headers = PlainHeaders(tar.encoding, tar.errors) if isinstance(tar.fileobj, ForwardReader) else None
    while True:
        try:
            member = _next_member(tar, headers)
        except Exception as error:
            yield from member_issues.flush()
            yield from grouper.broken(error, tar.offset)
            return False
        if member is None:
            break
        issue = _member_issue(grouper.shard, member)
        if issue is not None:
            if not grouper.attach(issue):
                yield from member_issues.add(issue)
            continue
        held = member_issues.take(split_key(member.name)[0])
        yield from member_issues.flush()
        yield from grouper.begin(member.name)
        if held is not None:
            grouper.attach(held)
        too_large = bounds.issue(grouper.shard, *split_key(member.name), member.name, member.size)
        if too_large is not None:  # never read: reading the next header skips its bytes in pieces
            grouper.attach(too_large)
            continue
        try:
            data = member_data(tar, member)
        except Exception as error:
            yield from grouper.broken(error, member.offset_data)
            return False
        yield from grouper.add(member.name, data)
    yield from member_issues.flush()
    yield from grouper.flush()  # a real end marker was read: the last group is complete
    return True


def _iter_stream(shard: str, stream: IO[bytes], config: ReaderConfig) -> Iterator[RawSample | ReadIssue]:
    grouper = _Grouper(shard)
    try:
        tar = open_tar(stream, _tarinfo_class(config.max_member_bytes))
    except Exception as error:  # not a tar at all, empty, broken compression: same policy as mid-stream
        yield from grouper.broken(error, 0)
        return
    with contextlib.closing(tar):
        if (yield from _iter_members(grouper, tar, MemberBounds.from_config(config))):
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
def _open_stream(url: str, tally: StreamTally | None = None) -> Iterator[IO[bytes]]:
    """The shard's tar stream. `tally` (the embed stage's) hashes the bytes as they come from the source, before
    any decompression: the digest of the shard file itself, without a second read (pipeline/content_id.py)."""
    with contextlib.ExitStack() as stack:
        compression = None
        if url.startswith("pipe:"):
            raw = stack.enter_context(_pipe_stream(url[len("pipe:"):]))
        else:
            # fsspec does not know .tgz; tarfile's own gzip reader would skip the CRC check, so hand it to fsspec's
            compression = fsspec.core.get_compression(url, "gzip" if url.lower().endswith(".tgz") else "infer")
            if url.startswith(("/", "./", "../")):  # a local path (see shards.local_path): no URL or "::" parsing
                raw = stack.enter_context(LocalFileSystem().open(os.path.abspath(url), "rb"))
            elif is_http(url):  # read so that a cut connection keeps what arrived (pipeline/http_read.py)
                raw = stack.enter_context(ResumingHTTPReader(url))
            else:
                raw = stack.enter_context(fsspec.open(url, "rb"))
        if tally is not None:
            raw = tally.wrap(raw)
        yield stack.enter_context(fsspec.compression.compr[compression](raw, mode="rb")) if compression else raw


def iter_shard(url: str, config: ReaderConfig, tally: StreamTally | None = None) -> Iterator[RawSample | ReadIssue]:
    """Stream one shard: a RawSample per key group, a ReadIssue for everything that cannot be used. `tally`, when
    given, receives the SHA-256 of the shard's bytes as they are read."""
    check_pipe_allowed(url, config.allow_pipe)
    with contextlib.ExitStack() as stack:
        try:
            stream = stack.enter_context(_open_stream(url, tally))
        except (OSError, ValueError) as error:
            logger.warning("%s: cannot open: %s", url, describe_error(error))
            yield ReadIssue(url, "", "shard_unreadable", describe_error(error))
            return
        yield from _iter_stream(url, stream, config)
