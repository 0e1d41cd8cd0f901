"""One pass over the annotated Parquet files: the selection rule as it was applied, the summed histograms and
counts the plots and cards need (`Stats`: the selection column's histogram and AUROC, clean_score next to
encoder_cosine, per noise kind), and the rows of the galleries: ranked by the selection column, or seeded random
samples of the kept, the dropped and (where truth_clean is known) the wrongly kept and wrongly dropped pairs.

Per-file aggregation into fixed-size arrays keeps memory bounded by one annotated file. The scan runs mapped
over groups of files (`scan_files`, one small `ScanPartial` per group: histograms, at most GALLERY_SIZE picks per
gallery, the example candidates and the bounded pair sample); `merge_scans` adds the partials in file order and
gets exactly what one pass over every file would.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bicro_clean.pipeline import progress
from bicro_clean.pipeline.config import COSINE_COLUMNS, CleanConfig
from bicro_clean.pipeline.parquet_io import join
from bicro_clean.pipeline.report.compare import COMPARED, SAMPLE, PairSample
from bicro_clean.pipeline.report.kinds import KindStats
from bicro_clean.pipeline.report.threshold import (SCORE_COLUMNS, ScoreBins, add_bins, bin_ranges, bins_like,
                                                   column_ranges, merge_bins)

GALLERY_SIZE = 12
HIST_BINS = 40
AUC_BINS = 10_000  # AUROC from per-class histograms: exact up to ties inside a 1e-4 wide bin
ROW_COLUMNS = ("shard", "key", "decision", "reason", "caption", *SCORE_COLUMNS, "anchor_key_i2t", "anchor_key_t2i",
               "truth_clean", "noise_kind")
TOP_REASONS = 3  # per-shard table: the most frequent drop or error reasons


@dataclass(frozen=True)
class Rule:
    """The selection rule as it was applied: column and the effective threshold (keep_fraction's cut value)."""

    column: str
    threshold: float
    by_fraction: bool

    @classmethod
    def from_run(cls, config: CleanConfig, manifest: dict[str, Any]) -> "Rule":
        value = (manifest.get("cutoff") or {}).get("value")
        if config.select.keep_fraction is not None and isinstance(value, (int, float)) and math.isfinite(value):
            return cls(config.select.column, float(value), True)
        return cls(config.select.column, float(config.select.threshold), False)

    @property
    def span(self) -> tuple[float, float]:
        """The column's documented range: [-1, 1] for the cosines, [0, 1] for every other score."""
        return (-1.0, 1.0) if self.column in COSINE_COLUMNS else (0.0, 1.0)


def annotated_paths(config: CleanConfig, manifest: dict[str, Any]) -> list[str]:
    return [join(config.output, o["path"]) for o in manifest.get("outputs", []) if o.get("kind") == "annotated"]


def _pair() -> dict[str, np.ndarray]:
    return {d: np.zeros(HIST_BINS, np.int64) for d in ("keep", "drop")}


@dataclass
class Stats:
    """Everything the plots and counts need, summed over annotated files (fixed-size arrays)."""

    main: dict[str, np.ndarray] = field(default_factory=_pair)  # the selection column, kept / dropped
    p_clean: dict[str, np.ndarray] = field(default_factory=_pair)
    # per AUROC column (the selection column, clean_score, encoder_cosine): histograms of truly clean / noisy
    auc: dict[str, dict[bool, np.ndarray]] = field(default_factory=dict)
    truth: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("rows", "noisy", "kept", "kept_clean", "clean_scored"), 0))
    scored: int = 0
    kept_clean_score: list[float] = field(default_factory=lambda: [0.0, 0.0])  # sum and count over kept pairs
    # each file's sum of kept clean_score, in file order: the merge adds them one by one, as one pass would (a
    # float sum depends on its order)
    kept_sums: list[float] = field(default_factory=list)
    bins: ScoreBins = field(default_factory=ScoreBins)
    pairs: PairSample = field(default_factory=PairSample)  # clean_score vs encoder_cosine, for the agreement
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard id -> counts and top reasons
    kinds: KindStats = field(default_factory=KindStats)  # per noise_kind, where the files carry one

    def auroc(self, column: str) -> float | None:
        hists = self.auc.get(column)
        return binned_auroc(hists[True], hists[False]) if hists else None

    @property
    def kinds_column(self) -> str | None:
        """The column whose AUROC per noise kind is shown: the selection column (the first AUROC column)."""
        return next(iter(self.auc), None)

    def kind_rows(self) -> list[tuple[str, int, int, float | None]]:
        column = self.kinds_column
        return self.kinds.rows(self.auc[column][True] if column else None, binned_auroc)

    @property
    def aligned(self) -> bool:
        """encoder_cosine has values: the encoder is aligned (open_clip) and clean_score can be set next to it."""
        return self.pairs.pairs > 0


def _hist(values: np.ndarray, bins: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    values = values[np.isfinite(values)]
    return np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))[0].astype(np.int64)


def _floats(table: Any, column: str) -> np.ndarray:
    """Any float width (clean_score is float64, the other scores float32) as float64, nulls as NaN."""
    return np.asarray(pc.fill_null(table[column], float("nan")).to_numpy(zero_copy_only=False), dtype=np.float64)


def _objects(column: Any) -> np.ndarray:
    values = column.to_numpy(zero_copy_only=False)
    return values if values.dtype == object else values.astype(object)


def read_rows(path: str, rule_column: str) -> dict[str, np.ndarray]:
    """The columns the report needs from one annotated file; a score column the file lacks reads as all NaN, so
    a run from before a column existed still gets its report (without that column's figures)."""
    with fsspec.open(path, "rb") as fh:
        names = set(pq.read_schema(fh).names)
        wanted = sorted(c for c in {*ROW_COLUMNS, rule_column} if c in names)
        table = pq.read_table(fh, columns=wanted)
    # object arrays of the same Python values as to_pylist, built by Arrow in C (no Python loop per row)
    rows = {c: _objects(table[c]) for c in wanted}
    for column in {*SCORE_COLUMNS, rule_column}:
        rows[column] = _floats(table, column) if column in names else np.full(table.num_rows, np.nan)
    for column in ("truth_clean", "noise_kind"):
        rows.setdefault(column, np.full(table.num_rows, None, dtype=object))
    return rows


def add_stats(stats: Stats, rows: dict[str, np.ndarray], rule: Rule, prio: np.ndarray) -> None:
    scored = rows["decision"] != "error"
    stats.scored += int(scored.sum())
    for decision in ("keep", "drop"):
        chosen = scored & (rows["decision"] == decision)
        stats.main[decision] += _hist(rows[rule.column][chosen], HIST_BINS, *rule.span)
        stats.p_clean[decision] += _hist(rows["p_clean"][chosen], HIST_BINS)
    kept_score = rows["clean_score"][rows["decision"] == "keep"]
    kept_score = kept_score[np.isfinite(kept_score)]
    stats.kept_clean_score[0] += float(kept_score.sum())
    stats.kept_sums.append(float(kept_score.sum()))
    stats.kept_clean_score[1] += len(kept_score)
    stats.pairs.add(rows["clean_score"][scored], rows["encoder_cosine"][scored], prio[scored])
    add_truth(stats, rows, scored)


def shard_counts(rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """One annotated file's row counts by decision and its most frequent drop/error reasons."""
    decision, reason = rows["decision"], rows["reason"]
    codes, counts = np.unique(reason[decision != "keep"].astype(str), return_counts=True)
    top = sorted(zip(codes.tolist(), counts.tolist()), key=lambda item: (-item[1], item[0]))[:TOP_REASONS]
    return {"in": len(decision), "kept": int((decision == "keep").sum()), "dropped": int((decision == "drop").sum()),
            "errors": int((decision == "error").sum()), "reasons": top}


def truth_masks(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(known, clean) of a truth_clean object array (True, False or None per row), elementwise in numpy."""
    known = np.not_equal(truth, None).astype(bool)
    return known, known & np.equal(truth, True).astype(bool)


def add_truth(stats: Stats, rows: dict[str, np.ndarray], scored: np.ndarray) -> None:
    known, clean = truth_masks(rows["truth_clean"])
    kept = rows["decision"] == "keep"
    for name, mask in (("rows", known), ("noisy", known & ~clean), ("kept", known & kept),
                       ("kept_clean", clean & kept), ("clean_scored", clean & scored)):
        stats.truth[name] += int(mask.sum())
    for column in stats.auc:
        binned = stats.bins.columns[column]
        for label, mask in ((True, clean & scored), (False, known & ~clean & scored)):
            stats.auc[column][label] += _hist(rows[column][mask], AUC_BINS, binned.lo, binned.hi)
    add_kinds(stats, rows, scored)


def add_kinds(stats: Stats, rows: dict[str, np.ndarray], scored: np.ndarray) -> None:
    """Per noise_kind: pairs, kept, and the selection column's AUC histogram (for AUROC against the clean pairs)."""
    column = stats.kinds_column
    if column is None:
        return
    binned, values = stats.bins.columns[column], rows[column][scored]
    stats.kinds.add(rows["noise_kind"][scored], rows["decision"][scored] == "keep",
                    lambda mask: _hist(values[mask], AUC_BINS, binned.lo, binned.hi))


def auc_columns(rule: Rule, bins: ScoreBins) -> dict[str, dict[bool, np.ndarray]]:
    """Empty per-class histograms for the columns whose AUROC the page shows (those the files hold)."""
    wanted = dict.fromkeys((rule.column, *COMPARED))
    return {c: {t: np.zeros(AUC_BINS, np.int64) for t in (True, False)} for c in wanted if c in bins.columns}


def binned_auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(score_pos > score_neg) + P(tie)/2 from two histograms on the same bins."""
    n_pos, n_neg = int(positive.sum()), int(negative.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.cumsum(negative) - negative  # negatives in strictly lower bins
    wins = float((positive * below).sum()) + 0.5 * float((positive * negative).sum())
    return wins / (n_pos * n_neg)


# ---------------------------------------------------------------- gallery picks


Pick = tuple[tuple, dict[str, Any]]  # (sort key, row); the smallest sort keys win


def _priority(seed: int, shard: str, key: str) -> int:
    """Seeded pseudo-random rank of a row, independent of file order (a reservoir without the reservoir)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{shard}\0{key}".encode(), digest_size=8).digest(), "big")


def _row(rows: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {c: (float(v[i]) if v.dtype.kind == "f" else v[i]) for c, v in rows.items()}


def _smallest(rows: dict[str, np.ndarray], index: np.ndarray, numeric: list[np.ndarray], sort_key: Any) -> list[Pick]:
    """heapq.nsmallest(GALLERY_SIZE, index, key=sort_key) where sort_key(i) starts with the `numeric` columns
    (then shard and key): candidates are ranked in numpy first, so Python sees only the GALLERY_SIZE best rows
    and the rows tied with the last of them on every numeric column."""
    if len(index) > GALLERY_SIZE:
        columns = [c[index] for c in numeric]
        order = np.lexsort(columns[::-1])
        last = order[GALLERY_SIZE - 1]
        tied = np.logical_and.reduce([c == c[last] for c in columns])
        index = index[np.union1d(order[:GALLERY_SIZE], np.flatnonzero(tied))]
    best = heapq.nsmallest(GALLERY_SIZE, index.tolist(), key=sort_key)
    return [(sort_key(i), _row(rows, i)) for i in best]


def priorities(rows: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """`_priority` of every row: the same digests, joined and read as big-endian words in one numpy call."""
    digests = b"".join(hashlib.blake2b(f"{seed}\0{s}\0{k}".encode(), digest_size=8).digest()
                       for s, k in zip(rows["shard"], rows["key"]))
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def file_picks(rows: dict[str, np.ndarray], rule: Rule, prio: np.ndarray) -> dict[str, list[Pick]]:
    """Each gallery's best rows in one file, ranked by the selection column. Ties (many soft labels are exactly
    0, 0.5 or 1; clean_score has none) go to p_clean for soft_label, then to a seeded random order, so a gallery
    is not just the first shard's first keys."""
    shard, key, value = rows["shard"], rows["key"], rows[rule.column]
    # soft_label's ties are broken by the posterior it was built from; other columns need no second score
    second = rows["p_clean"] if rule.column == "soft_label" else np.zeros(len(value))
    scored = np.flatnonzero((rows["decision"] != "error") & ~np.isnan(value) & ~np.isnan(second))
    kept, dropped = rows["decision"] == "keep", rows["decision"] == "drop"
    known, clean = truth_masks(rows["truth_clean"])

    def rank(i: int) -> tuple[int, str, str]:
        return int(prio[i]), shard[i], key[i]

    distance = np.abs(value - rule.threshold)
    return {
        "lowest": _smallest(rows, scored, [value, second, prio], lambda i: (value[i], second[i], *rank(i))),
        "borderline": _smallest(rows, scored, [distance, prio], lambda i: (abs(value[i] - rule.threshold), *rank(i))),
        "random_kept": _smallest(rows, np.flatnonzero(kept), [prio], rank),
        "random_dropped": _smallest(rows, np.flatnonzero(dropped), [prio], rank),
        # where truth is known: what the rule got wrong, in a seeded random order (a fair sample of the errors)
        "kept_noisy": _smallest(rows, np.flatnonzero(kept & known & ~clean), [prio], rank),
        "dropped_clean": _smallest(rows, np.flatnonzero(dropped & clean), [prio], rank),
    }


def merge_picks(into: dict[str, list[Pick]], new: dict[str, list[Pick]]) -> None:
    for name, picks in new.items():
        into[name] = heapq.nsmallest(GALLERY_SIZE, into.get(name, []) + picks, key=lambda p: p[0])


@dataclass(frozen=True)
class ScanSetup:
    """What every mapped scan needs, the same for all groups: the rule, the seed and each score column's run-wide
    bin range (from the files' footers, before the scan)."""

    rule: Rule
    seed: int
    ranges: dict[str, tuple[float, float]]


@dataclass
class ScanPartial:
    """One group of annotated files, scanned: sizes independent of its rows (the pair sample at most SAMPLE)."""

    stats: Stats
    picks: dict[str, list[Pick]]


def scan_setup(paths: list[str], rule: Rule, seed: int) -> ScanSetup:
    return ScanSetup(rule, seed, bin_ranges(column_ranges(paths, rule.column)))


def _empty_stats(setup: ScanSetup) -> Stats:
    bins = bins_like(setup.ranges)
    return Stats(bins=bins, auc=auc_columns(setup.rule, bins))


def scan_files(paths: list[str], setup: ScanSetup) -> ScanPartial:
    """The per-row work over one group of annotated files (a mapped task)."""
    stats, picks = _empty_stats(setup), {}
    for path in paths:
        rows = read_rows(path, setup.rule.column)
        prio = priorities(rows, setup.seed)
        add_stats(stats, rows, setup.rule, prio)
        add_bins(stats.bins, rows, rows["decision"] != "error", prio)
        stats.shards[path.rsplit("/", 1)[-1].removesuffix(".parquet")] = shard_counts(rows)
        merge_picks(picks, file_picks(rows, setup.rule, prio))
        progress.report("report", advance=1)  # the report bar: annotated files scanned (pipeline/progress.py)
    # Past SAMPLE pairs the whole run's sample is the SAMPLE smallest priorities, which are among each group's own
    # SAMPLE smallest; up to SAMPLE no group trims, so the pairs stay in file order, as in one pass.
    stats.pairs.trim()
    return ScanPartial(stats, picks)


def _add_pairs(into: PairSample, part: PairSample) -> None:
    """PairSample.add of a group's sample: concatenated in file order, trimmed as adding its files would."""
    into.pairs += part.pairs
    into.priority = np.concatenate([into.priority, part.priority])
    into.clean = np.concatenate([into.clean, part.clean])
    into.cosine = np.concatenate([into.cosine, part.cosine])
    if len(into.priority) > 2 * SAMPLE:
        into.trim()


def add_partial(into: Stats, part: Stats) -> None:
    """A later group's stats into `into` (groups in file order): sums, and the merges that equal one pass."""
    for decision in ("keep", "drop"):
        into.main[decision] += part.main[decision]
        into.p_clean[decision] += part.p_clean[decision]
    for column, hists in part.auc.items():
        for label, counts in hists.items():
            into.auc[column][label] += counts
    for name, count in part.truth.items():
        into.truth[name] += count
    into.scored += part.scored
    for kept_sum in part.kept_sums:
        into.kept_clean_score[0] += kept_sum
    into.kept_clean_score[1] += part.kept_clean_score[1]
    _add_pairs(into.pairs, part.pairs)
    merge_bins(into.bins, part.bins)
    into.shards.update(part.shards)
    into.kinds.merge(part.kinds)


def merge_scans(setup: ScanSetup, partials: list[ScanPartial]) -> tuple[Stats, dict[str, list[dict[str, Any]]]]:
    """The groups' partials, in file order, as one pass over every file: summed stats and the galleries' rows."""
    stats, picks = _empty_stats(setup), {}
    for part in partials:
        add_partial(stats, part.stats)
        merge_picks(picks, part.picks)
    return stats, {name: [row for _, row in found] for name, found in picks.items()}


def scan_annotated(paths: list[str], rule: Rule, seed: int) -> tuple[Stats, dict[str, list[dict[str, Any]]]]:
    """One pass over the annotated files, in this process: summed histograms and the galleries' rows."""
    setup = scan_setup(paths, rule, seed)
    return merge_scans(setup, [scan_files(paths, setup)])
