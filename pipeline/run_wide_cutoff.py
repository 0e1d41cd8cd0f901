"""The keep-fraction cutoff over every shard as a bounded map-reduce, exactly as the in-memory ranking.

The ranking (select.py, which calls `count_scored` and `cut_row`): a row's score column descending, ties by (shard, key) ascending; the cutoff is the
n_keep-th row. Finding its value is a selection problem on the score's bits:

1. Every score maps to a 64-bit key whose unsigned order is the float order (`order_keys`). Each file returns a
   histogram of its keys' top 16 bits (65,536 counts); their sum says which bin holds the n_keep-th largest
   value. The next pass histograms the next 16 bits inside that bin only, and so on. Once the bin holds at most
   COLLECT_ROWS values they are collected and partitioned in memory (at most 4 passes for float64, however
   many rows are tied).
2. A last pass counts, per file, the rows above the cut value and, per shard, the rows tied at it. The shard
   holding the (n_keep - above)-th tied row in (shard, key) order is read again and only its tied keys are
   sorted.

Memory: 65,536 counts, COLLECT_ROWS floats and one shard's tied keys, whatever the crawl's size; every read is
one file's score column (on a thread pool).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bicro_clean.pipeline.parallel_io import imap, pmap
from bicro_clean.pipeline.parquet_io import read_columns

logger = logging.getLogger(__name__)

STEP_BITS = 16  # bits resolved per histogram pass: 65,536 bins of int64 = 512 KB
COLLECT_ROWS = 1 << 22  # a bin this small is collected and partitioned directly (32 MB of keys)
_SIGN = np.uint64(1 << 63)


def stored_values(column: pa.ChunkedArray) -> np.ndarray:
    """A score column in its stored float type (float32 stays float32), nulls (error rows) as NaN."""
    return column.to_numpy().astype(column.type.to_pandas_dtype())


def order_keys(values: np.ndarray) -> np.ndarray:
    """Finite-or-infinite scores -> uint64 keys in the same order (NaN must be removed first).

    float32 widens to float64 exactly; -0.0 becomes 0.0 (they compare equal, so they must share a key)."""
    bits = (np.asarray(values, dtype=np.float64) + 0.0).view(np.uint64)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_value(key: int) -> float:
    """The float a key came from (inverse of `order_keys`)."""
    key = np.uint64(key)
    bits = key & ~_SIGN if key & _SIGN else ~key
    return float(np.array([bits], np.uint64).view(np.float64)[0])


@dataclass(frozen=True)
class _Prefix:
    """The keys whose top `bits` bits equal `value`: the part of the key space still searched."""

    bits: int = 0
    value: int = 0

    def mask(self, keys: np.ndarray) -> np.ndarray:
        if self.bits == 0:
            return np.ones(len(keys), bool)
        return (keys >> np.uint64(64 - self.bits)) == np.uint64(self.value)

    def child(self, b: int) -> "_Prefix":
        return _Prefix(self.bits + STEP_BITS, (self.value << STEP_BITS) | b)


def _keys(path: str, column: str, prefix: _Prefix) -> np.ndarray:
    values = stored_values(read_columns(path, [column])[column])
    keys = order_keys(values[~np.isnan(values)])
    return keys[prefix.mask(keys)]


def _histogram(path: str, column: str, prefix: _Prefix) -> np.ndarray:
    keys = _keys(path, column, prefix)
    shift = np.uint64(64 - prefix.bits - STEP_BITS)
    return np.bincount(((keys >> shift) & np.uint64((1 << STEP_BITS) - 1)).astype(np.int64),
                       minlength=1 << STEP_BITS)


def _kth_key(paths: list[str], column: str, rank: int, total: int) -> int:
    """The key of ascending rank `rank` (0-based) among the run's `total` scored rows."""
    prefix = _Prefix()
    while total > COLLECT_ROWS and prefix.bits < 64:
        counts = sum(pmap(lambda p: _histogram(p, column, prefix), paths), np.zeros(1 << STEP_BITS, np.int64))
        below = np.cumsum(counts)
        b = int(np.searchsorted(below, rank, side="right"))  # first bin whose cumulative count passes `rank`
        rank -= int(below[b - 1]) if b else 0
        total, prefix = int(counts[b]), prefix.child(b)
    keys = np.concatenate([*pmap(lambda p: _keys(p, column, prefix), paths), np.zeros(0, np.uint64)])
    return int(np.partition(keys, rank)[rank])


def _scored(path: str, column: str) -> int:
    return int(pc.sum(pc.invert(pc.is_nan(pc.fill_null(read_columns(path, [column])[column], float("nan")))))
               .as_py() or 0)


@dataclass
class _TieCounts:
    above: int
    tied_by_shard: Counter


def _tie_counts(path: str, column: str, value: float) -> _TieCounts:
    table = read_columns(path, ["shard", column])
    values = stored_values(table[column])
    hit = values == value
    shards = table["shard"].filter(pa.array(hit)) if hit.any() else pa.array([], pa.string())
    counts = pc.value_counts(shards).to_pylist() if len(shards) else []
    return _TieCounts(int(np.count_nonzero(values > value)), Counter({c["values"]: c["counts"] for c in counts}))


def _tied_keys(path: str, column: str, value: float, shard: str) -> pa.Array:
    table = read_columns(path, ["shard", "key", column])
    hit = pa.array(stored_values(table[column]) == value)
    tied = table.filter(hit)
    return tied.filter(pc.equal(tied["shard"], shard))["key"].combine_chunks().cast(pa.large_string())


def count_scored(score_paths: list[str], column: str) -> int:
    """Rows of the run with a score (not NaN, not null) in `column`."""
    return sum(pmap(lambda p: _scored(p, column), score_paths))


def cut_row(score_paths: list[str], column: str, n_scored: int, n_keep: int) -> tuple[float, str, str]:
    """(value, shard, key) of the n_keep-th row (1 <= n_keep <= n_scored) of the ranking, equal to ranking every
    row in memory (select.cutoff_in_memory)."""
    value = key_value(_kth_key(score_paths, column, n_scored - n_keep, n_scored))
    ties = pmap(lambda p: _tie_counts(p, column, value), score_paths)
    above = sum(t.above for t in ties)
    by_shard: Counter = sum((t.tied_by_shard for t in ties), Counter())
    position = n_keep - above - 1  # the cutoff row's place among the tied rows in (shard, key) order
    for shard in sorted(by_shard):
        if position < by_shard[shard]:
            holders = [p for p, t in zip(score_paths, ties) if shard in t.tied_by_shard]
            keys = pa.concat_arrays(list(imap(lambda p: _tied_keys(p, column, value, shard), holders)))
            key = keys.take(pc.sort_indices(keys))[position].as_py()
            logger.info("select: keep-fraction cutoff %s=%r at shard %s key %s (%d of %d rows)", column, value,
                        shard, key, n_keep, n_scored)
            return value, shard, key
        position -= by_shard[shard]
    raise RuntimeError(f"keep-fraction cutoff: {n_keep - above} tied rows expected at {column}={value!r}")
