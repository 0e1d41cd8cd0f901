"""Keep/drop decisions from scores: pure functions on arrays, no IO.

Two rules, both from the SelectConfig:

- threshold: keep an ok row when its score column is >= threshold;
- keep_fraction (DataComp vocabulary): keep the top fraction of all scored rows of the run, ranked by the
  column (descending) with ties broken by (shard, key) ascending. The global cutoff is computed once from all
  shards' score columns (`cutoff_from_columns`), so each shard then decides on its own, independently and
  deterministically (`decide`).

Every row gets a decision (keep / drop / error) and a reason code: nothing disappears without a row.

The policy above is pure (arrays in, arrays out). The select stage at the end of this file feeds it: the
run-wide values (the keep-fraction cutoff, keys repeated across shards), each a bounded merge of per-file
partials (pipeline.run_wide_cutoff, pipeline.run_wide_keys), and one shard's decisions from its scores table.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from bicro_clean.pipeline import run_wide_cutoff, run_wide_keys
from bicro_clean.pipeline.config import CleanConfig

logger = logging.getLogger(__name__)

KEEP, DROP, ERROR = "keep", "drop", "error"
REASON_KEPT = "kept"
REASON_BELOW_FRACTION = "below_keep_fraction"
SCORE_COLUMNS = (
    "clean_score", "p_clean", "consistency", "r_i2t", "r_t2i", "soft_label", "match_score", "encoder_cosine"
)


@dataclass(frozen=True)
class Cutoff:
    """The last kept row of the global ranking; a row is kept when it ranks at or before it."""

    n_keep: int
    n_scored: int
    value: float = math.inf
    shard: str = ""
    key: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"n_keep": self.n_keep, "n_scored": self.n_scored, "value": self.value, "shard": self.shard,
                "key": self.key}


def low_reason(column: str) -> str:
    return f"low_{column}"


def check_column(column: str) -> None:
    if column not in SCORE_COLUMNS:
        raise ValueError(f"select.column must be one of {', '.join(SCORE_COLUMNS)}; got {column!r}")


def n_to_keep(n_scored: int, fraction: float) -> int:
    """Top fraction as a count; floor, so the kept share never exceeds the fraction asked for."""
    return int(math.floor(fraction * n_scored + 1e-9))


def _floats(values: np.ndarray) -> np.ndarray:
    """As given when already floating (float32 score columns stay 4 bytes a row), else float64."""
    values = np.asarray(values)
    return values if np.issubdtype(values.dtype, np.floating) else values.astype(np.float64)


def kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest finite value (1-based); NaN (unscored) values never rank."""
    finite = values[~np.isnan(values)]
    return float(np.partition(finite, len(finite) - k)[len(finite) - k])


def cutoff_from_columns(values: np.ndarray, ties: Iterable[tuple[str, str]], fraction: float) -> Cutoff:
    """The global cutoff from every scored row's value and the (shard, key) of rows tied at the cut value.

    Two cheap passes make this bounded by one float per row: `values` are all scores of the run; `ties`
    are the (shard, key) pairs whose value equals `cut_value(values, fraction)` (collected in a second pass).
    """
    values = _floats(values)
    n_scored = int(np.count_nonzero(~np.isnan(values)))
    n_keep = n_to_keep(n_scored, fraction)
    if n_keep == 0:
        return Cutoff(0, n_scored)
    value = kth_largest(values, n_keep)
    above = int(np.count_nonzero(values > value))
    shard, key = sorted(ties)[n_keep - above - 1]
    return Cutoff(n_keep, n_scored, value, shard, key)


def cut_value(values: np.ndarray, fraction: float) -> float | None:
    """The score value of the last kept row (None when nothing is kept): the rows to collect ties for."""
    values = _floats(values)
    n_keep = n_to_keep(int(np.count_nonzero(~np.isnan(values))), fraction)
    return kth_largest(values, n_keep) if n_keep else None


def cutoff_in_memory(values: np.ndarray, shards: np.ndarray, keys: np.ndarray, fraction: float) -> Cutoff:
    """`cutoff_from_columns` when all rows fit in memory (tests, single-shard runs)."""
    values = _floats(values)
    cut = cut_value(values, fraction)
    tied = np.flatnonzero(values == cut) if cut is not None else np.array([], dtype=np.int64)
    return cutoff_from_columns(values, [(str(shards[i]), str(keys[i])) for i in tied], fraction)


def keep_by_cutoff(values: np.ndarray, shards: np.ndarray, keys: np.ndarray, cutoff: Cutoff) -> np.ndarray:
    """Rows ranking at or before the cutoff row: higher value, or equal value and (shard, key) not after it."""
    values = np.asarray(values, dtype=np.float64)
    if cutoff.n_keep == 0:
        return np.zeros(len(values), dtype=bool)
    kept = values > cutoff.value
    for i in np.flatnonzero(values == cutoff.value):  # only tied rows need the (shard, key) comparison
        kept[i] = (str(shards[i]), str(keys[i])) <= (cutoff.shard, cutoff.key)
    return kept


def keep_by_threshold(values: np.ndarray, threshold: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return ~np.isnan(values) & (values >= threshold)


def drop_reasons(column: str, n: int, by_fraction: bool) -> np.ndarray:
    """Why each row would be dropped: the rule the user chose (low_<column> or below_keep_fraction), nothing
    else, so a drop can always be traced to the column and the threshold or fraction that caused it."""
    return np.full(n, REASON_BELOW_FRACTION if by_fraction else low_reason(column), dtype=object)


def decide(ok: np.ndarray, error_reason: np.ndarray, values: np.ndarray, shards: np.ndarray, keys: np.ndarray, *,
           column: str, threshold: float, cutoff: Cutoff | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(decision, reason) per row. `cutoff` switches from the threshold rule to the keep-fraction rule.

    Error rows (`ok` False) keep the reader's reason code; their score values are ignored.
    """
    ok = np.asarray(ok, dtype=bool)
    if cutoff is None:
        kept = keep_by_threshold(values, threshold)
    else:
        kept = keep_by_cutoff(values, shards, keys, cutoff)
    kept &= ok
    reason = drop_reasons(column, len(ok), cutoff is not None)
    reason[kept] = REASON_KEPT
    reason[~ok] = np.asarray(error_reason, dtype=object)[~ok]
    decision = np.where(kept, KEEP, DROP).astype(object)
    decision[~ok] = ERROR
    return decision, reason


def drop_details(reason: np.ndarray, values: np.ndarray, *, column: str, threshold: float,
                 cutoff: Cutoff | None = None) -> list[str | None]:
    """A short human-readable why for each dropped row (None elsewhere), e.g. 'soft_label=0.31 < 0.5'."""
    out: list[str | None] = [None] * len(reason)
    for i, code in enumerate(reason):
        if code == REASON_BELOW_FRACTION and cutoff is not None:
            out[i] = f"{column}={float(values[i]):.4g} below the top {cutoff.n_keep} of {cutoff.n_scored}"
        elif code == low_reason(column):
            out[i] = f"{column}={float(values[i]):.4g} < threshold={threshold:g}"
    return out


# ---------------------------------------------------------------- the select stage


@dataclass(frozen=True)
class RunWide:
    """The two run-wide values every shard's write needs, computed once before any shard is written."""

    cutoff: Cutoff | None  # keep_fraction runs only
    duplicates: frozenset[str]  # ok keys present in more than one shard (renamed in the cleaned shards)


def check_select(config: CleanConfig, encoder: dict[str, Any] | None = None) -> None:
    """Fail before the work it would spoil: an unknown column, or encoder_cosine from an unaligned encoder."""
    check_column(config.select.column)
    if encoder is not None and config.select.column == "encoder_cosine" and not encoder.get("aligned"):
        raise ValueError("select.column=encoder_cosine needs an aligned encoder (open_clip); "
                         f"{encoder.get('spec')} is not aligned")


def duplicate_keys(embedding_paths: Iterable[str]) -> frozenset[str]:
    """Keys of ok rows that occur in more than one shard (within a shard the reader already rejects repeats):
    hashed per file and merged bucket by bucket (pipeline.run_wide_keys), memory independent of the crawl."""
    return run_wide_keys.duplicate_keys(embedding_paths)


def global_cutoff(score_paths: list[str], column: str, fraction: float) -> Cutoff:
    """The keep-fraction cutoff over every shard, as `cutoff_in_memory` over all rows would give it, from
    per-file histograms and a pass over the cut bin and the tied rows only (pipeline.run_wide_cutoff)."""
    n_scored = run_wide_cutoff.count_scored(score_paths, column)
    n_keep = n_to_keep(n_scored, fraction)
    if n_keep == 0:
        return Cutoff(0, n_scored)
    return Cutoff(n_keep, n_scored, *run_wide_cutoff.cut_row(score_paths, column, n_scored, n_keep))


def run_wide_values(config: CleanConfig, embedding_paths: list[str], score_paths: list[str]) -> RunWide:
    cutoff = None
    if config.select.keep_fraction is not None:
        cutoff = global_cutoff(score_paths, config.select.column, config.select.keep_fraction)
    return RunWide(cutoff, duplicate_keys(embedding_paths))


def shard_decisions(config: CleanConfig, table: pa.Table, cutoff: Cutoff | None) -> dict[str, Any]:
    """ok flag, decision, reason and detail for every row of one shard's scores table."""
    column = config.select.column
    ok = np.asarray(table["status"].to_pylist(), dtype=object) == "ok"
    values = table[column].to_numpy().astype(np.float64)
    shards, keys = np.asarray(table["shard"].to_pylist()), np.asarray(table["key"].to_pylist())
    rule = dict(column=column, threshold=config.select.threshold, cutoff=cutoff)
    decision, reason = decide(ok, np.asarray(table["reason"].to_pylist(), dtype=object), values, shards, keys,
                              **rule)
    detail = drop_details(reason, values, **rule)
    detail = [d if good else reader for d, good, reader in zip(detail, ok, table["detail"].to_pylist())]
    return {"ok": ok, "decision": decision, "reason": reason, "detail": detail}
