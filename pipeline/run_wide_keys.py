"""Keys repeated across shards, as a bounded map-reduce over 64-bit key hashes.

Map (one file at a time, on a thread pool): the ok rows' distinct keys of one embeddings file, hashed to 64 bits
with numpy (no Python object per key). Reduce: the (hash, file) pairs of the run, spilled to local scratch in
hash buckets once they pass a memory budget, then one bucket at a time sorted with numpy; a hash seen more than
once is a candidate. Only candidates' files are read again, and only the candidates' key strings are compared,
so a hash collision between different keys never renames anything.

Memory is the budget (a few tens of MB), one file's keys and the result itself: independent of the crawl. There
is no concatenation of every key of the run, so no 32-bit string offsets to overflow (the earlier pass failed
past 2^31 bytes of keys, about 2x10^8 keys).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bicro_clean.pipeline.parallel_io import imap
from bicro_clean.pipeline.parquet_io import read_columns

logger = logging.getLogger(__name__)

SPILL_ROWS = 1 << 21  # (hash, file) pairs held before spilling to buckets: 24 MB
BUCKET_BITS = 8  # 256 buckets: at 10^9 keys about 4M pairs (48 MB) a bucket
HASH_CHUNK = 1 << 16  # keys hashed at once (bounds the per-byte temporaries)
_MUL = np.uint64(0x100000001B3)  # FNV's 64-bit prime: an odd multiplier for the per-position weights
_RECORD = np.dtype([("hash", "<u8"), ("file", "<u4")])


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: spreads every input bit over the whole word (the polynomial alone does not)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hash_chunk(keys: pa.Array) -> np.ndarray:
    offsets = np.frombuffer(keys.buffers()[1], np.int64 if pa.types.is_large_string(keys.type) else np.int32)
    offsets = offsets[keys.offset:keys.offset + len(keys) + 1].astype(np.int64)
    lengths = np.diff(offsets)
    data = keys.buffers()[2]
    raw = np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    position = np.arange(len(raw), dtype=np.int64) - np.repeat(offsets[:-1] - offsets[0], lengths)
    longest = int(lengths.max()) if len(lengths) else 0
    with np.errstate(over="ignore"):
        weights = np.cumprod(np.full(max(longest, 1), _MUL, np.uint64))  # _MUL^(position+1), wrapping mod 2^64
        terms = (raw.astype(np.uint64) + np.uint64(1)) * weights[position]
        sums = np.zeros(len(keys), np.uint64)
        filled = lengths > 0
        if filled.any():  # reduceat over empty segments would repeat a neighbour's byte
            sums[filled] = np.add.reduceat(terms, (offsets[:-1] - offsets[0])[filled])
        return _splitmix(sums ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))


def key_hashes(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of non-null strings, equal strings to equal hashes, in numpy (no Python per key)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks != 1 else keys.chunk(0)
    parts = [_hash_chunk(keys.slice(i, HASH_CHUNK)) for i in range(0, len(keys), HASH_CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def ok_keys(path: str) -> pa.Array:
    """The distinct keys of one embeddings file's ok rows."""
    table = read_columns(path, ["key", "status"])
    return pc.unique(table.filter(pc.equal(table["status"], "ok"))["key"]).cast(pa.large_string())


class _HashPairs:
    """(hash, file) pairs of the run: in memory up to SPILL_ROWS, then appended to bucket files in scratch."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.held = 0
        self.scratch: str | None = None

    def add(self, hashes: np.ndarray, file: int) -> None:
        records = np.empty(len(hashes), _RECORD)
        records["hash"], records["file"] = hashes, file
        self.parts.append(records)
        self.held += len(records)
        if self.held >= SPILL_ROWS:
            self._spill()

    def _spill(self) -> None:
        if self.scratch is None:
            self.scratch = tempfile.mkdtemp(prefix="bicro-clean-keys-")
        records = np.concatenate(self.parts)
        self.parts, self.held = [], 0
        bucket = records["hash"] >> np.uint64(64 - BUCKET_BITS)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange((1 << BUCKET_BITS) + 1))
        for b in range(1 << BUCKET_BITS):
            if bounds[b] < bounds[b + 1]:
                with open(os.path.join(self.scratch, f"{b:04x}"), "ab") as fh:
                    records[order[bounds[b]:bounds[b + 1]]].tofile(fh)

    def buckets(self) -> Iterable[np.ndarray]:
        if self.scratch is None:
            yield np.concatenate(self.parts) if self.parts else np.zeros(0, _RECORD)
            return
        self._spill()
        for name in sorted(os.listdir(self.scratch)):
            yield np.fromfile(os.path.join(self.scratch, name), _RECORD)

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _candidates(records: np.ndarray) -> np.ndarray:
    """The records whose hash occurs more than once in this bucket (each file contributes distinct keys)."""
    records = records[np.argsort(records["hash"], kind="stable")]
    same = records["hash"][1:] == records["hash"][:-1]
    repeated = np.zeros(len(records), bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    return records[repeated]


def duplicate_keys(embedding_paths: Iterable[str]) -> frozenset[str]:
    """Keys of ok rows that occur in more than one shard (within a shard the reader already rejects repeats)."""
    paths = list(embedding_paths)
    pairs = _HashPairs()
    try:
        for file, keys in enumerate(imap(ok_keys, paths)):
            pairs.add(key_hashes(keys), file)
        candidates = [c for bucket in pairs.buckets() if len(c := _candidates(bucket))]
    finally:
        pairs.close()
    if not candidates:
        return frozenset()
    found = np.concatenate(candidates)
    wanted = np.unique(found["hash"])
    files = np.unique(found["file"]).tolist()

    def candidate_keys(file: int) -> list[str]:
        keys = ok_keys(paths[file])
        return keys.filter(pa.array(np.isin(key_hashes(keys), wanted))).to_pylist()

    seen: Counter = Counter()
    for keys in imap(candidate_keys, files):
        seen.update(keys)  # distinct within a file, so the count is the number of files holding the key
    repeated = frozenset(k for k, n in seen.items() if n > 1)
    logger.info("select: %d keys in more than one shard (%d hash candidates)", len(repeated), len(wanted))
    return repeated
