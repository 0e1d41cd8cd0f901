"""What a threshold on each score column would keep: fine histograms (counts, and truly clean counts where
truth_clean is known) on fixed per-column ranges, and a bounded, seeded set of example pairs per coarse bin for
the slider's "pairs nearest the threshold".

The ranges come from the Parquet footers' min/max statistics (one footer read per file, before the scan), so a
single pass fills fixed-size arrays: the report's size and memory do not grow with the number of rows. Counts
are exact at bin edges: kept(t = edge k) = sum of bins k.. (the last bin holds the values equal to the maximum).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

# clean_score first: the default selection column (calibrated P(clean)); the slider and curves follow this order
SCORE_COLUMNS = ("clean_score", "soft_label", "p_clean", "consistency", "match_score", "encoder_cosine")
BINS = 1000  # slider positions per column: the bin edges
EXAMPLE_BINS = 32  # coarse bins per column that each keep a few seeded example pairs
EXAMPLES_PER_BIN = 2
EXAMPLE_BUCKET = 64  # example candidates: rows in the first 64 of a file beat later ones (see add_examples)
EXAMPLE_FIELDS = ("shard", "key", "caption", "decision", "truth_clean")
ESTIMATE = "clean_score"  # the calibrated P(clean): its sums per bin give the expected figures without truth
# Its sums are kept in fixed point (units of 2^-30) in int64: integer sums do not depend on the order they were
# added in, so any grouping of the files merges to the same bytes, and 2^63 / 2^30 leaves room for 8.6e9 pairs
# per bin (at most 4.7e-10 rounding per pair).
SCALE = 2**30
CHUNK = 2**22  # rows per float64 bincount: a chunk's per-bin sum stays below 2^53, so it is an exact integer

Example = tuple[tuple, dict[str, Any]]  # (seeded sort key, row); the smallest keys win


@dataclass
class ColumnBins:
    """One score column: range, per-bin counts of scored pairs, truly clean and truth-known pairs, examples."""

    name: str
    lo: float
    hi: float
    total: np.ndarray = field(default_factory=lambda: np.zeros(BINS + 1, np.int64))
    clean: np.ndarray = field(default_factory=lambda: np.zeros(BINS + 1, np.int64))
    known: np.ndarray = field(default_factory=lambda: np.zeros(BINS + 1, np.int64))
    examples: dict[int, list[Example]] = field(default_factory=dict)
    # per bin of this column: how many pairs have a clean_score, and the sum of their clean_score (fixed point)
    estimated: np.ndarray = field(default_factory=lambda: np.zeros(BINS + 1, np.int64))
    score_sum: np.ndarray = field(default_factory=lambda: np.zeros(BINS + 1, np.int64))

    def index(self, values: np.ndarray) -> np.ndarray:
        """Bin of each value: floor((v - lo) / width * BINS), BINS for v == hi."""
        scaled = np.floor((values - self.lo) / (self.hi - self.lo) * BINS)
        return np.clip(scaled, 0, BINS).astype(np.int64)

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, BINS + 1)

    def curves(self) -> dict[str, np.ndarray | None]:
        """At every edge: kept fraction of scored pairs; precision and recall of truly clean pairs (truth known)."""
        kept = np.cumsum(self.total[::-1])[::-1]
        out: dict[str, np.ndarray | None] = {"kept": kept / max(int(self.total.sum()), 1),
                                             "precision": None, "recall": None}
        if self.known.sum() and self.clean.sum():
            clean_kept = np.cumsum(self.clean[::-1])[::-1]
            known_kept = np.cumsum(self.known[::-1])[::-1]
            with np.errstate(invalid="ignore", divide="ignore"):
                out["precision"] = np.where(known_kept > 0, clean_kept / np.maximum(known_kept, 1), np.nan)
            out["recall"] = clean_kept / int(self.clean.sum())
        return out

    def sums(self) -> np.ndarray:
        """Sum of clean_score per bin, as floats."""
        return self.score_sum / SCALE

    def expected(self) -> dict[str, np.ndarray] | None:
        """At every edge, without truth: the expected precision of the kept pairs (mean clean_score of those with
        a clean_score) and the expected clean pairs lost (sum of clean_score below the edge); None without
        clean_score."""
        if not self.estimated.sum():
            return None
        sums = self.sums()
        kept_sum, kept_n = np.cumsum(sums[::-1])[::-1], np.cumsum(self.estimated[::-1])[::-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(kept_n > 0, kept_sum / np.maximum(kept_n, 1), np.nan)
        return {"precision": precision, "lost": np.r_[0.0, np.cumsum(sums)[:-1]]}


@dataclass
class ScoreBins:
    """Every score column present in the annotated files."""

    columns: dict[str, ColumnBins] = field(default_factory=dict)

    @property
    def has_truth(self) -> bool:
        return any(int(c.known.sum()) > 0 for c in self.columns.values())

    def noise_share(self) -> float | None:
        """The run's estimated noise share: 1 - mean clean_score over the pairs with one (None without any). The
        integer sum makes it the same figure however the files were grouped."""
        column = self.columns.get(ESTIMATE)
        n = int(column.estimated.sum()) if column is not None else 0
        return 1.0 - int(column.score_sum.sum()) / SCALE / n if n else None


def _range(fh: Any, column: str) -> tuple[float, float] | None:
    """min/max of one column from a file's footer; reads the column itself only when statistics are missing."""
    pfile = pq.ParquetFile(fh)
    meta = pfile.metadata
    position = meta.schema.names.index(column)
    lo, hi = math.inf, -math.inf
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(position).statistics
        if stats is None or not stats.has_min_max:
            values = np.asarray(pfile.read(columns=[column])[column].to_numpy(zero_copy_only=False), np.float64)
            values = values[np.isfinite(values)]
            return (float(values.min()), float(values.max())) if len(values) else None
        if stats.null_count == meta.row_group(g).num_rows:
            continue
        lo, hi = min(lo, float(stats.min)), max(hi, float(stats.max))
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def report_columns(rule_column: str) -> tuple[str, ...]:
    """SCORE_COLUMNS, plus the run's selection column when it is another one (r_i2t, r_t2i): the slider must
    be able to start on the column the run selected on."""
    return tuple(dict.fromkeys((*SCORE_COLUMNS, rule_column)))


def column_ranges(paths: list[str], rule_column: str = SCORE_COLUMNS[0]) -> ScoreBins:
    """The score columns the files hold, each with its run-wide range (empty or all-null columns left out)."""
    ranges: dict[str, tuple[float, float]] = {}
    columns = report_columns(rule_column)
    for path in paths:
        with fsspec.open(path, "rb") as fh:
            names = pq.read_schema(fh).names
            for column in (c for c in columns if c in names):
                found = _range(fh, column)
                if found is not None:
                    old = ranges.get(column, found)
                    ranges[column] = (min(old[0], found[0]), max(old[1], found[1]))
    if ESTIMATE in ranges:  # clean_score on its whole range: every slider position is a round threshold (k / 1000)
        ranges[ESTIMATE] = (min(ranges[ESTIMATE][0], 0.0), max(ranges[ESTIMATE][1], 1.0))
    return bins_like({c: (ranges[c][0], ranges[c][1] if ranges[c][1] > ranges[c][0] else ranges[c][0] + 1.0)
                      for c in columns if c in ranges})  # a fixed column order


def bins_like(ranges: dict[str, tuple[float, float]]) -> ScoreBins:
    """Empty bins on the given (lo, hi) ranges, in their order: what each mapped scan of a group fills."""
    return ScoreBins({name: ColumnBins(name, lo, hi) for name, (lo, hi) in ranges.items()})


def bin_ranges(bins: ScoreBins) -> dict[str, tuple[float, float]]:
    return {name: (column.lo, column.hi) for name, column in bins.columns.items()}


def merge_bins(into: ScoreBins, part: ScoreBins) -> None:
    """A later group's bins into `into`: counts summed; each coarse bin's examples are the smallest keys of both,
    earlier files first among equal keys, which is what adding the group's files one by one would keep."""
    for name, column in part.columns.items():
        target = into.columns[name]
        target.total += column.total
        target.known += column.known
        target.clean += column.clean
        target.estimated += column.estimated
        target.score_sum += column.score_sum
        for c, found in column.examples.items():
            target.examples[c] = heapq.nsmallest(EXAMPLES_PER_BIN, target.examples.get(c, []) + found,
                                                 key=lambda e: e[0])


def add_bins(bins: ScoreBins, rows: dict[str, np.ndarray], scored: np.ndarray, rank: np.ndarray) -> None:
    """One annotated file's scored rows into every column's histograms and example heaps. `rank` is each row's
    seeded pseudo-random priority (an int per row), so examples do not depend on the order of the files."""
    truth = rows["truth_clean"]
    known = np.not_equal(truth, None).astype(bool)  # elementwise on the object array: no Python loop per row
    clean = known & np.equal(truth, True).astype(bool)
    estimate = rows.get(ESTIMATE)
    for column in bins.columns.values():
        if column.name not in rows:
            continue
        values = rows[column.name]
        take = scored & ~np.isnan(values)
        index = column.index(values[take])
        column.total += np.bincount(index, minlength=BINS + 1)
        column.known += np.bincount(index[known[take]], minlength=BINS + 1)
        column.clean += np.bincount(index[clean[take]], minlength=BINS + 1)
        if estimate is not None:
            add_sums(column, index, estimate[take])
        add_examples(column, rows, np.flatnonzero(take), index, rank, bins)


def add_sums(column: ColumnBins, index: np.ndarray, estimate: np.ndarray) -> None:
    """Count and fixed-point sum of clean_score per bin (pairs without a clean_score left out)."""
    has = np.isfinite(estimate)
    index, fixed = index[has], np.rint(estimate[has] * SCALE)  # exact integers in float64 (|clean_score| <= 1)
    column.estimated += np.bincount(index, minlength=BINS + 1)
    for start in range(0, len(index), CHUNK):
        part = np.bincount(index[start:start + CHUNK], weights=fixed[start:start + CHUNK], minlength=BINS + 1)
        column.score_sum += part.astype(np.int64)


def add_examples(column: ColumnBins, rows: dict[str, np.ndarray], where: np.ndarray, index: np.ndarray,
                 rank: np.ndarray, bins: ScoreBins) -> None:
    coarse = index * EXAMPLE_BINS // (BINS + 1)
    # Rows early in their file win (then the seeded rank): the thumbnails are cut by streaming each shard only
    # as far as its last wanted key, and the row order inside a shard says nothing about its scores.
    bucket = where // EXAMPLE_BUCKET
    order = np.lexsort((rank[where], bucket, coarse))
    sorted_coarse = coarse[order]
    for position in _firsts(sorted_coarse):  # each coarse bin's EXAMPLES_PER_BIN smallest ranks in this file
        i = int(where[order[position]])
        row = {f: rows[f][i] for f in EXAMPLE_FIELDS if f in rows}
        row.update({c: float(rows[c][i]) for c in bins.columns if c in rows})
        key = (int(i // EXAMPLE_BUCKET), int(rank[i]), str(rows["shard"][i]), str(rows["key"][i]))
        c = int(sorted_coarse[position])
        column.examples[c] = heapq.nsmallest(EXAMPLES_PER_BIN, column.examples.get(c, []) + [(key, row)],
                                             key=lambda e: e[0])


def _firsts(sorted_groups: np.ndarray) -> np.ndarray:
    """Positions of the first EXAMPLES_PER_BIN entries of each run of equal values in a sorted array."""
    if not len(sorted_groups):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    run = np.arange(len(sorted_groups)) - np.repeat(starts, np.diff(np.r_[starts, len(sorted_groups)]))
    return np.flatnonzero(run < EXAMPLES_PER_BIN)


def example_rows(bins: ScoreBins) -> list[dict[str, Any]]:
    """Every column's examples, each pair once, in a fixed order."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for column in bins.columns.values():
        for c in sorted(column.examples):
            for _, row in column.examples[c]:
                found.setdefault((str(row["shard"]), str(row["key"])), row)
    return [found[k] for k in sorted(found)]
