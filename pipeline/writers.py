"""Output writers: annotated/filtered Parquet, cleaned WebDataset shards, stats, keep keys, manifest.

Everything is written atomically (temp file, then rename) and deterministically: no timestamps, tar members
with mtime 0 and uid/gid 0, JSON with sorted keys, samples in input order. Rerunning a run therefore gives
byte-identical files, and a crash never leaves a partial file under a final name.

Cleaned shards are numbered over the whole run (`00000.tar`, `00001.tar`, ...): each input shard's write puts its
kept samples into a part (pipeline/parts.py) and the pack step (pipeline/pack.py) copies them into the numbered
tars. The tar bytes are written here directly (`tar_header`, `sample_blob`, `tar_end`), as tarfile writes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bicro_clean.pipeline.parallel_io import imap
from bicro_clean.pipeline.parquet_io import atomic_output, write_parquet_atomic
from bicro_clean.pipeline.shards import REASONS, shard_ids

logger = logging.getLogger(__name__)

TAR_BLOCK = tarfile.BLOCKSIZE
TAR_END = 2 * tarfile.BLOCKSIZE  # two zero blocks close an archive
TAR_RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to whole records (like `tar -b20`)
BICRO_JSON_KEY = "bicro"
_PAX_ARGS = (tarfile.PAX_FORMAT, "utf-8", "surrogateescape")  # what tarfile.open(format=PAX_FORMAT) writes with


# ---------------------------------------------------------------- tar members


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header with nothing machine- or time-dependent in it."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _UstarTemplate:
    """tarfile's header for a member whose name and size need no PAX record, filled in by formatting.

    tarfile.TarInfo.tobuf costs ~13 us a member (it was most of the write stage's time): for these members the
    block is tarfile's own header for ("", 0) with only the name, size and checksum slots differing, so it is
    taken from tarfile once and checked against tarfile on probes; a Python whose tarfile differs fails the
    check and every header is then built by tarfile itself.
    """

    NAME, SIZE_END, CHKSUM, CHKSUM_END = 100, 136, 148, 155  # slot offsets in the 512-byte block

    def __init__(self) -> None:
        blank = tar_info("", 0).tobuf(*_PAX_ARGS)
        self.mid, self.mtime, self.tail = blank[self.NAME:124], blank[self.SIZE_END:self.CHKSUM], \
            blank[self.CHKSUM_END:]
        # the checksum counts its own slot as 8 spaces (256); the rest is constant but for name and size
        self.base = 256 + sum(self.mid) + sum(self.mtime) + sum(blank[self.CHKSUM + 8:])

    def header(self, name: str, size: int) -> bytes:
        raw, digits = name.encode("ascii"), b"%011o\0" % size
        chksum = self.base + sum(raw) + sum(digits)
        return b"".join((raw.ljust(self.NAME, b"\0"), self.mid, digits, self.mtime, b"%06o\0" % chksum, self.tail))

    def matches_tarfile(self) -> bool:
        probes = [("", 0), ("a", 1), ("00000/000000001.jpg", 123_456), ("x" * 100, 8**11 - 1), ("k\0.txt", 512)]
        return all(self.header(n, s) == tar_info(n, s).tobuf(*_PAX_ARGS) for n, s in probes)


def _ustar_template() -> _UstarTemplate | None:
    template = _UstarTemplate()
    return template if template.matches_tarfile() else None


_USTAR = _ustar_template()


def tar_header(name: str, size: int) -> bytes:
    """The member's header block(s) exactly as tarfile writes them in PAX format.

    tarfile adds a PAX record for a name that is not ASCII or longer than 100 characters, or a size of 8 GiB or
    more; those (rare) go through tarfile, every other one through the template.
    """
    if _USTAR is not None and len(name) <= _USTAR.NAME and size < 8**11 and name.isascii():
        return _USTAR.header(name, size)
    return tar_info(name, size).tobuf(*_PAX_ARGS)


def member_bytes(name: str, size: int) -> int:
    """Exact bytes a member takes in a PAX tar: its header(s) plus the data padded to whole blocks."""
    return len(tar_header(name, size)) + -(-size // TAR_BLOCK) * TAR_BLOCK


def json_with_scores(raw: bytes | None, scores: dict[str, Any], doc: dict[str, Any] | None = None) -> bytes:
    """The sample's JSON with `scores` under "bicro"; its other fields and their order are kept.

    Only kept samples get here, and the reader turns a JSON that is not an object into an invalid_json error,
    so parsing cannot lose anything. `doc`: `json_object(raw)` when the caller parsed it already (it gets the
    scores in place).
    """
    doc = json_object(raw) if doc is None else doc
    doc[BICRO_JSON_KEY] = scores
    try:
        return json.dumps(doc, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate ("\ud800" in the input) has no UTF-8 form; ASCII escapes keep it exactly
        return json.dumps(doc, ensure_ascii=True, allow_nan=False).encode("ascii")


def json_object(raw: bytes | None) -> dict[str, Any]:
    """A sample JSON as a dict; {} when absent or not a JSON object (the reader records invalid_json)."""
    try:
        parsed = json.loads(raw) if raw is not None else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def renamed_member(name: str, key: str, new_key: str) -> str:
    """Member name under a new key: the key prefix is swapped, the extension part kept."""
    return new_key + name[len(key):] if name.startswith(key) else f"{new_key}.{name.rsplit('.', 1)[-1]}"


def sample_members(key: str, members: dict[str, bytes], names: dict[str, str], new_key: str,
                   scores: dict[str, Any], doc: dict[str, Any] | None = None) -> list[tuple[str, bytes]]:
    """(member name, bytes) of one kept sample: every member byte for byte, except the JSON gets scores.

    `doc`: `json_object(members.get("json"))` when the caller parsed it already (the write stage reads its
    truth_clean from every sample), so it is not parsed twice.
    """
    out = []
    for ext, data in members.items():
        name = names.get(ext, f"{key}.{ext}")
        if new_key != key:
            name = renamed_member(name, key, new_key)
        out.append((name, json_with_scores(data, scores, doc) if ext == "json" else data))
    if "json" not in members:
        out.append((f"{new_key}.json", json_with_scores(None, scores, doc)))
    return out


# ---------------------------------------------------------------- sharded tar writer


def sample_blob(members: list[tuple[str, bytes]]) -> bytes:
    """One sample's members as tar bytes: each member's header, its data, zero padding to a whole block."""
    parts = []
    for name, data in members:
        parts += (tar_header(name, len(data)), data, bytes(-len(data) % TAR_BLOCK))
    return b"".join(parts)


def tar_end(payload: int) -> bytes:
    """What tarfile.close writes after `payload` member bytes: two zero blocks, then zeros to a whole record."""
    return bytes(TAR_END + -(payload + TAR_END) % TAR_RECORD)


class HashingSink:
    """Write-only file wrapper that hashes and counts what passes through (no re-read to fingerprint)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)


@dataclass
class OutputShard:
    """One cleaned tar and its img2dataset-style stats."""

    name: str  # e.g. "00003" (shards/00003.tar)
    path: str = ""
    count: int = 0  # input samples attributed to this output shard (kept, dropped and failed)
    successes: int = 0  # samples written into the tar
    status: Counter = field(default_factory=Counter)  # reason code -> samples
    renamed: list[dict[str, str]] = field(default_factory=list)
    sha256: str = ""
    bytes: int = 0

    def stats(self, input_shards: list[str]) -> dict[str, Any]:
        """`<name>_stats.json`: `count` is the input samples attributed to this tar (kept, dropped and failed) from
        `input_shards` (as given), `successes` the samples in it."""
        # img2dataset's `failed` means a sample that could not be had: here, one the reader could not use (a
        # reader reason code); pairs the selection rule dropped are `dropped`, never `failed`
        failed = sum(n for reason, n in self.status.items() if reason in REASONS)
        return {"shard": self.name, "input_shards": input_shards, "count": self.count,
                "successes": self.successes, "dropped": self.count - self.successes - failed, "failed": failed,
                "status_dict": dict(sorted(self.status.items())), "renamed_keys": self.renamed,
                "sha256": self.sha256, "bytes": self.bytes}


# ---------------------------------------------------------------- JSON and Parquet outputs


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_json_atomic(path: str, obj: Any) -> None:
    with atomic_output(path) as tmp, fsspec.open(tmp, "wb") as fh:
        fh.write(json_bytes(obj))


def read_json(path: str) -> Any | None:
    try:
        with fsspec.open(path, "rb") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None


def write_annotated(table: pa.Table, annotated_path: str, filtered_path: str, meta: dict[str, Any]) -> None:
    """The full per-sample table and its kept rows (exactly `annotated[decision == 'keep']`)."""
    write_parquet_atomic(table, annotated_path, meta)
    write_parquet_atomic(kept_rows(table), filtered_path, meta)


def kept_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["decision"], "keep"))


def write_keep_keys(filtered_paths: Iterable[str], path: str) -> int:
    """(shard, shard_id, key, uid) of every kept sample, streamed one filtered file at a time; returns the row count.
    uid is null where the sample's .json has none (or a filtered file has no uid column)."""
    rows = 0
    with atomic_output(path) as tmp, fsspec.open(tmp, "wb") as fh:
        with pq.ParquetWriter(fh, KEEP_KEYS_SCHEMA, compression="zstd") as writer:
            for part in imap(_keep_keys_part, filtered_paths):  # read ahead on a bounded thread pool, in order
                writer.write_table(part)
                rows += part.num_rows
    return rows


KEEP_KEYS_SCHEMA = pa.schema([("shard", pa.string()), ("shard_id", pa.string()), ("key", pa.string()),
                              ("uid", pa.string())])


def _keep_keys_part(filtered: str) -> pa.Table:
    with fsspec.open(filtered, "rb") as src:
        source = pq.ParquetFile(src)
        names = [n for n in KEEP_KEYS_SCHEMA.names if n in source.schema_arrow.names]
        part = source.read(columns=names)
    if "uid" not in names:
        part = part.append_column("uid", pa.nulls(part.num_rows, pa.string()))
    if "shard_id" not in names:  # a filtered file written before it had the column: the same ids, computed
        part = part.append_column("shard_id", pa.array(shard_ids(part["shard"].to_pylist()), pa.string()))
    return part.select(KEEP_KEYS_SCHEMA.names).cast(KEEP_KEYS_SCHEMA)
