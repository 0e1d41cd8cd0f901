"""One pass over the annotated Parquet files: the selection rule as it was applied, the summed histograms and
counts the plots and cards need (`Stats`), and the rows of the three galleries.

Per-file aggregation into fixed-size arrays keeps memory bounded by one annotated file.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.parquet_io import join
from bicro_clean.pipeline.report.threshold import SCORE_COLUMNS, ScoreBins, add_bins, column_ranges

GALLERY_SIZE = 12
HIST_BINS = 40
CURVE_BINS = 200
AUC_BINS = 10_000  # AUROC from per-class histograms: exact up to ties inside a 1e-4 wide bin
ROW_COLUMNS = ("shard", "key", "decision", "reason", "caption", *SCORE_COLUMNS, "anchor_key_i2t", "anchor_key_t2i",
               "truth_clean")
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


def annotated_paths(config: CleanConfig, manifest: dict[str, Any]) -> list[str]:
    return [join(config.output, o["path"]) for o in manifest.get("outputs", []) if o.get("kind") == "annotated"]


@dataclass
class Stats:
    """Everything the plots and counts need, summed over annotated files (fixed-size arrays)."""

    soft: dict[str, np.ndarray] = field(default_factory=lambda: {d: np.zeros(HIST_BINS, np.int64)
                                                                 for d in ("keep", "drop")})
    p_clean: dict[str, np.ndarray] = field(default_factory=lambda: {d: np.zeros(HIST_BINS, np.int64)
                                                                    for d in ("keep", "drop")})
    curve: np.ndarray = field(default_factory=lambda: np.zeros(CURVE_BINS, np.int64))
    at_one: int = 0  # soft_label == 1 exactly (anchors): kept even at threshold 1
    auc: dict[bool, np.ndarray] = field(default_factory=lambda: {t: np.zeros(AUC_BINS, np.int64)
                                                                 for t in (True, False)})
    truth: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("rows", "noisy", "kept", "kept_clean", "clean_scored"), 0))
    scored: int = 0
    bins: ScoreBins = field(default_factory=ScoreBins)
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard id -> counts and top reasons


def _hist(values: np.ndarray, bins: int) -> np.ndarray:
    return np.histogram(np.clip(values, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0].astype(np.int64)


def _floats(table: Any, column: str) -> np.ndarray:
    return np.asarray(pc.fill_null(table[column], float("nan")).to_numpy(zero_copy_only=False), dtype=np.float64)


def read_rows(path: str, rule_column: str) -> dict[str, np.ndarray]:
    """The columns the report needs from one annotated file (whichever of them it has)."""
    with fsspec.open(path, "rb") as fh:
        names = set(pq.read_schema(fh).names)
        wanted = sorted(c for c in {*ROW_COLUMNS, rule_column} if c in names)
        table = pq.read_table(fh, columns=wanted)
    rows = {c: np.asarray(table[c].to_pylist(), dtype=object) for c in wanted}
    for column in {*SCORE_COLUMNS, rule_column} & names:
        rows[column] = _floats(table, column)
    rows.setdefault("truth_clean", np.full(table.num_rows, None, dtype=object))
    return rows


def add_stats(stats: Stats, rows: dict[str, np.ndarray]) -> None:
    scored = (rows["decision"] != "error") & ~np.isnan(rows["soft_label"])
    stats.scored += int(scored.sum())
    for decision in ("keep", "drop"):
        chosen = scored & (rows["decision"] == decision)
        stats.soft[decision] += _hist(rows["soft_label"][chosen], HIST_BINS)
        stats.p_clean[decision] += _hist(rows["p_clean"][chosen], HIST_BINS)
    soft = rows["soft_label"][scored]
    stats.curve += _hist(soft, CURVE_BINS)
    stats.at_one += int((soft >= 1.0).sum())
    add_truth(stats, rows, scored)


def shard_counts(rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """One annotated file's row counts by decision and its most frequent drop/error reasons."""
    decision, reason = rows["decision"], rows["reason"]
    codes, counts = np.unique(reason[decision != "keep"].astype(str), return_counts=True)
    top = sorted(zip(codes.tolist(), counts.tolist()), key=lambda item: (-item[1], item[0]))[:TOP_REASONS]
    return {"in": len(decision), "kept": int((decision == "keep").sum()), "dropped": int((decision == "drop").sum()),
            "errors": int((decision == "error").sum()), "reasons": top}


def add_truth(stats: Stats, rows: dict[str, np.ndarray], scored: np.ndarray) -> None:
    truth = rows["truth_clean"]
    known = np.array([t is not None for t in truth], dtype=bool)
    clean = np.array([t is True for t in truth], dtype=bool)
    kept = rows["decision"] == "keep"
    for name, mask in (("rows", known), ("noisy", known & ~clean), ("kept", known & kept),
                       ("kept_clean", clean & kept), ("clean_scored", clean & scored)):
        stats.truth[name] += int(mask.sum())
    for label, mask in ((True, clean & scored), (False, known & ~clean & scored)):
        stats.auc[label] += _hist(rows["soft_label"][mask], AUC_BINS)


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


def _smallest(rows: dict[str, np.ndarray], index: Iterable[int], sort_key: Any) -> list[Pick]:
    best = heapq.nsmallest(GALLERY_SIZE, index, key=sort_key)
    return [(sort_key(i), _row(rows, i)) for i in best]


def priorities(rows: dict[str, np.ndarray], seed: int) -> np.ndarray:
    return np.array([_priority(seed, s, k) for s, k in zip(rows["shard"], rows["key"])], dtype=np.uint64)


def file_picks(rows: dict[str, np.ndarray], rule: Rule, prio: np.ndarray) -> dict[str, list[Pick]]:
    """Each gallery's best rows in one file. Ties (many soft labels are exactly 0, 0.5 or 1) go to a seeded
    random order, so a gallery is not just the first shard's first keys."""
    shard, key, soft, p_clean = rows["shard"], rows["key"], rows["soft_label"], rows["p_clean"]
    scored = np.flatnonzero((rows["decision"] != "error") & ~np.isnan(soft))
    value = rows[rule.column]
    kept = np.flatnonzero(rows["decision"] == "keep")
    rank = {int(i): (int(prio[i]), shard[i], key[i]) for i in np.union1d(scored, kept)}
    return {
        "lowest": _smallest(rows, scored, lambda i: (soft[i], p_clean[i], *rank[i])),
        "borderline": _smallest(rows, scored[~np.isnan(value[scored])],
                                lambda i: (abs(value[i] - rule.threshold), *rank[i])),
        "random_kept": _smallest(rows, kept, lambda i: rank[i]),
    }


def merge_picks(into: dict[str, list[Pick]], new: dict[str, list[Pick]]) -> None:
    for name, picks in new.items():
        into[name] = heapq.nsmallest(GALLERY_SIZE, into.get(name, []) + picks, key=lambda p: p[0])


def scan_annotated(paths: list[str], rule: Rule, seed: int) -> tuple[Stats, dict[str, list[dict[str, Any]]]]:
    """One pass over the annotated files: summed histograms and the three galleries' rows."""
    stats, picks = Stats(bins=column_ranges(paths)), {}
    for path in paths:
        rows = read_rows(path, rule.column)
        add_stats(stats, rows)
        prio = priorities(rows, seed)
        add_bins(stats.bins, rows, rows["decision"] != "error", prio)
        stats.shards[path.rsplit("/", 1)[-1].removesuffix(".parquet")] = shard_counts(rows)
        merge_picks(picks, file_picks(rows, rule, prio))
    return stats, {name: [row for _, row in found] for name, found in picks.items()}
