"""How many pairs the embed stage will read, known before it reads them: the total its progress bar and ETA count.

For display only; nothing here decides what a stage computes. A **local uncompressed tar** is counted from its
index: the member headers, read by seeking from one to the next (as `content_id.local_identity` reads them for
the shard's identity), each member's key (its name up to the first dot of the last path part, as the reader
groups members) and one pair per run of members with the same key. That is the reader's row count for any shard
it reads without damage; a damaged one differs by a few rows, and the stage corrects the total when the shard
is done. A **compressed, remote or `pipe:` shard** has no index to seek in (counting it would be a second full
read), so its pairs are a running estimate: the mean of the shards counted or embedded so far, revised each time
one more is embedded. With no local tar at all, the total appears when the first shard is done. A crawl of more
than `COUNT_LIMIT` shards has an even sample of them counted, the rest estimated from their mean.

`PairPlan` keeps, per shard, what it added to the stage's total, so that the stage's report of a finished shard
(`finish`) turns into the exact correction: the shard's real rows replace its count or estimate, a shard found
cached leaves the total (its pairs are not work of this run), and the estimate of the shards still unknown
follows the mean.
"""

from __future__ import annotations

import logging
import os
import tarfile
import threading
from typing import Callable

from bicro_clean.pipeline.content_id import local_file
from bicro_clean.pipeline.shards import split_key

logger = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
_META_TYPES = {b"x", b"g", b"L", b"K"}  # PAX headers, GNU long name/link: they describe the next member
_LONG_NAME_LIMIT = 1 << 16  # a long-name or PAX record larger than this is damage: the reader reports it
# Shards counted at most: reading an index costs ~0.2 s per 10,000 samples; past this many shards the mean of an
# even sample of them estimates the rest as well as counting all would (and each shard's rows correct it).
COUNT_LIMIT = 256


def _name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and block[345]:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _size(field: bytes) -> int | None:
    digits = field.strip(b" \0")
    if field[:1] and field[0] & 0x80:  # GNU base-256
        try:
            return tarfile.nti(field)
        except tarfile.InvalidHeaderError:
            return None
    try:
        return int(digits or b"0", 8)
    except ValueError:
        return None


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a PAX extended header ("<len> path=<name>\\n" records), if it has one."""
    for record in data.split(b"\n"):
        _, _, field = record.partition(b" ")
        if field.startswith(b"path="):
            return field[5:].decode("utf-8", "surrogateescape")
    return None


def count_tar(fd: int, size: int) -> int:
    """Pairs in an uncompressed tar: runs of consecutive members with the same key, from the headers alone."""
    offset, pairs, last_key, next_name = 0, 0, None, None
    while offset + BLOCK <= size:
        block = os.pread(fd, BLOCK, offset)
        length = _size(block[124:136])
        if not any(block) or length is None or length < 0:
            break  # the end marker, or damage (the reader reports it; the stage corrects the total)
        data_at, offset = offset + BLOCK, offset + BLOCK + -(-length // BLOCK) * BLOCK
        kind = block[156:157]
        if kind in _META_TYPES:
            if kind in (b"x", b"L") and length <= _LONG_NAME_LIMIT:
                data = os.pread(fd, length, data_at)
                next_name = _pax_path(data) if kind == b"x" else data.split(b"\0", 1)[0].decode(
                    "utf-8", "surrogateescape")
            continue
        name, next_name = next_name or _name(block), None
        key = split_key(name)[0]
        if key != last_key:
            pairs, last_key = pairs + 1, key
    return pairs


def tar_pairs(url: str) -> int | None:
    """The pairs of a local uncompressed tar counted from its headers; None where that is not cheap (compressed,
    remote, `pipe:`) or the file cannot be read (the reader reports why)."""
    try:
        path = local_file(url)
        if path is None:
            return None
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = os.pread(fh.fileno(), BLOCK, 0)
            tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")  # compressed, or no tar: HeaderError
            return count_tar(fh.fileno(), size)
    except (OSError, ValueError, tarfile.HeaderError) as error:
        logger.debug("%s: pairs not counted (%s)", url, error)
        return None


class PairPlan:
    """The embed stage's expected pairs, shard by shard: what each added to the total the display shows. Every
    shard starts estimated (the mean of the pairs known so far); `count` replaces an estimate by the shard's
    count, `finish` by its real rows. Each returns the change to the total, in whole pairs. Thread-safe: the
    counting thread and the stage's threads report to it at once."""

    def __init__(self, shards: list[str]) -> None:
        self._lock = threading.Lock()
        self.added: dict[str, float] = {}  # shard -> pairs it added to the total (a count or an estimate)
        self.unknown = set(shards)  # shards not counted, estimated at `guess` each
        self.seen: list[int] = []  # pairs per shard known so far: counted, then embedded
        self.guess = 0.0
        self.total = 0.0
        self.closed = False  # the stage is over: the counting thread stops

    def _change(self, update: Callable[[], None]) -> int:
        with self._lock:
            before = round(self.total)
            update()
            if self.unknown and self.seen:  # the running estimate of the shards not counted
                guess = sum(self.seen) / len(self.seen)
                self.total += (guess - self.guess) * len(self.unknown)
                self.guess = guess
            return round(self.total) - before

    def count(self, shard: str, pairs: int) -> int:
        """`shard`'s pairs counted from its index (before it is done)."""
        def update() -> None:
            if shard in self.unknown:
                self.unknown.discard(shard)
                self.added[shard] = pairs
                self.total += pairs - self.guess
                self.seen.append(pairs)
        return self._change(update)

    def finish(self, shard: str, rows: int, cached: bool) -> int:
        """`shard` is done with `rows` rows; `cached`: found finished, not embedded now, so it leaves the total."""
        def update() -> None:
            if shard in self.unknown:
                self.unknown.discard(shard)
                self.total -= self.guess
            elif shard in self.added:
                self.total -= self.added.pop(shard)
            else:
                return  # not this plan's shard (or reported twice: a group run again)
            self.total += 0 if cached else rows
            self.seen.append(rows)
        return self._change(update)

    def covers(self, shard: str) -> bool:
        return shard in self.unknown or shard in self.added


def to_count(shards: list[str], limit: int = COUNT_LIMIT) -> list[str]:
    """The shards whose index is read: all of them up to `limit`, else `limit` spread evenly over the crawl."""
    if len(shards) <= limit:
        return list(shards)
    return [shards[i * len(shards) // limit] for i in range(limit)]


def count_in_background(plan: PairPlan, shards: list[str], report: Callable[[int], None]) -> threading.Thread:
    """Count the shards' pairs from their indexes in a daemon thread (`to_count`, in input order), passing each
    change of the total to `report`: the total is there once the first shard is counted (milliseconds), not once
    all are."""
    def run() -> None:
        for shard in to_count(shards):
            if plan.closed:
                return
            pairs = tar_pairs(shard)
            if pairs is not None and (change := plan.count(shard, pairs)):
                report(change)

    thread = threading.Thread(target=run, name="bicro-pair-count", daemon=True)
    thread.start()
    return thread
