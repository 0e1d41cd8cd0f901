"""What a run estimates about its crawl from `clean_score` alone, without labels: one definition, used everywhere.

`clean_score` is a calibrated probability that a pair is clean (docs/bicro.md#clean_score), so over the rows that
have one (error rows have none):

- `noise_share`    = 1 - mean(clean_score) over every scored row: the estimated noisy share of the crawl;
- `kept_precision` = mean(clean_score) over the kept rows: the expected clean share of what was kept;
- `clean_lost`     = sum(clean_score) over the dropped rows: the expected number of clean pairs dropped;
- `scored`         = how many rows have a clean_score.

These are only as good as clean_score's calibration: its mean is what all three rest on.

They are computed bounded: each shard's write records its sums and counts (`shard_sums`, a few numbers), finalize
adds them up in input shard order (`add`) and turns the totals into the estimates (`estimates`), which go into
manifest.json and the run's summary. The report computes the same quantities from the annotated files.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from bicro_clean.pipeline.parquet_io import read_columns

logger = logging.getLogger(__name__)

SCORE = "clean_score"
KEEP, DROP = "keep", "drop"  # pipeline.select's decisions (not imported: select pulls in the scoring stack)
# The per-shard sums a write records, summed over shards by finalize.
SUM_FIELDS = ("scored", "score_sum", "kept_scored", "kept_score_sum", "dropped_scored", "dropped_score_sum")
ROUND = 6  # digits kept in the manifest: sums over different shard orders agree far beyond this


def empty_sums() -> dict[str, float]:
    return {name: 0 for name in SUM_FIELDS}


def _as_array(values: Any) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return pa.concat_arrays(values.chunks) if values.num_chunks else pa.array([], pa.float64())
    return values if isinstance(values, pa.Array) else pa.array(values, pa.float64(), from_pandas=True)


def shard_sums(clean_score: Any, decision: Iterable[str]) -> dict[str, float]:
    """Counts and sums of one shard's clean_score (nulls and NaN left out: error rows), overall, over its kept rows
    and over its dropped rows; `decision` is keep / drop / error per row, aligned with `clean_score`."""
    scores = np.asarray(_as_array(clean_score).cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)
    decisions = np.asarray(list(decision), dtype=object)
    if len(decisions) != len(scores):
        raise ValueError(f"{len(scores)} clean_score values for {len(decisions)} decisions")
    has = ~np.isnan(scores)
    kept, dropped = has & (decisions == KEEP), has & (decisions == DROP)
    return {"scored": int(has.sum()), "score_sum": float(scores[has].sum()),
            "kept_scored": int(kept.sum()), "kept_score_sum": float(scores[kept].sum()),
            "dropped_scored": int(dropped.sum()), "dropped_score_sum": float(scores[dropped].sum())}


def add(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    """`total` with one shard's sums added (in place, and returned)."""
    for name in SUM_FIELDS:
        total[name] += part[name]
    return total


def estimates(sums: dict[str, float]) -> dict[str, Any]:
    """The run's estimates from its summed `shard_sums`: noise_share, kept_precision (None when nothing was
    scored, or nothing scored was kept), clean_lost and scored."""
    scored, kept = int(sums["scored"]), int(sums["kept_scored"])
    return {
        "noise_share": round(1.0 - sums["score_sum"] / scored, ROUND) if scored else None,
        "kept_precision": round(sums["kept_score_sum"] / kept, ROUND) if kept else None,
        "clean_lost": round(float(sums["dropped_score_sum"]), ROUND),
        "scored": scored,
    }


def of_table(table: pa.Table) -> dict[str, Any]:
    """The estimates straight from an annotated table (its `clean_score` and `decision` columns)."""
    return estimates(shard_sums(table[SCORE], table["decision"].to_pylist()))


def collect(total: dict[str, float], result: dict[str, Any]) -> list[str]:
    """Add a shard write result's recorded sums to `total`; a result written before sums were recorded adds
    nothing and gives back its annotated file's path (`from_annotated` reads them there), so no shard is left out."""
    recorded = result.get("estimate_sums")
    if isinstance(recorded, dict) and all(name in recorded for name in SUM_FIELDS):
        add(total, recorded)
        return []
    return [o["path"] for o in result["outputs"] if o["kind"] == "annotated"]


def from_annotated(total: dict[str, float], paths: list[str]) -> dict[str, float]:
    """A copy of `total` with the sums of these annotated files added (results that recorded none: `collect`)."""
    total = dict(total)
    for path in paths:
        logger.info("estimates: %s has no recorded sums; reading them from the file", path)
        table = read_columns(path, [SCORE, "decision"])
        add(total, shard_sums(table[SCORE], table["decision"].to_pylist()))
    return total


def describe(found: dict[str, Any] | None) -> str:
    """One line for the run's summary, e.g. `estimated noise 38.2% of 3,000 scored pairs; kept pairs expected
    95.1% clean; ~312 clean pairs dropped`."""
    if not found or not found.get("scored"):
        return "no pair was scored, so nothing is estimated"
    parts = [f"estimated noise {found['noise_share']:.1%} of {found['scored']:,} scored pairs"]
    if found.get("kept_precision") is not None:
        parts.append(f"kept pairs expected {found['kept_precision']:.1%} clean")
    else:
        parts.append("no scored pair kept")
    parts.append(f"~{found['clean_lost']:,.0f} clean pairs dropped")
    return "; ".join(parts)

