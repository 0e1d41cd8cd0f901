"""The run's estimates from clean_score: one definition (noise share, expected precision of the kept pairs, expected
clean pairs dropped), computed from per-shard sums that add up to the same numbers as the whole table."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bicro_clean.pipeline import estimates


def _shard(rng: np.random.Generator, n: int) -> tuple[list[float | None], list[str]]:
    """clean_score and decision of `n` rows: some error rows (no score), some NaN, the rest kept at >= 0.5."""
    scores: list[float | None] = list(rng.uniform(0, 1, n))
    decisions = ["keep" if s >= 0.5 else "drop" for s in scores]
    for i in rng.choice(n, size=n // 10, replace=False):
        scores[i], decisions[i] = None, "error"
    return scores, decisions


def _direct(scores: list[float | None], decisions: list[str]) -> dict:
    """The definitions, written out over the whole table."""
    rows = [(s, d) for s, d in zip(scores, decisions) if s is not None and not math.isnan(s)]
    kept = [s for s, d in rows if d == "keep"]
    return {"noise_share": 1 - sum(s for s, _ in rows) / len(rows), "kept_precision": sum(kept) / len(kept),
            "clean_lost": sum(s for s, d in rows if d == "drop"), "scored": len(rows)}


def test_the_definitions_over_rows_with_a_clean_score():
    scores = [0.9, 0.8, None, 0.2, float("nan"), 0.4]
    decisions = ["keep", "keep", "error", "drop", "drop", "keep"]
    found = estimates.estimates(estimates.shard_sums(pa.array(scores, pa.float64()), decisions))
    assert found["scored"] == 4  # the null and the NaN row have no clean_score
    assert found["noise_share"] == pytest.approx(1 - (0.9 + 0.8 + 0.2 + 0.4) / 4)
    assert found["kept_precision"] == pytest.approx((0.9 + 0.8 + 0.4) / 3)
    assert found["clean_lost"] == pytest.approx(0.2)


def test_per_shard_sums_add_up_to_the_whole_table():
    rng = np.random.default_rng(0)
    shards = [_shard(rng, n) for n in (1, 57, 300, 1000)]
    total = estimates.empty_sums()
    for scores, decisions in shards:
        estimates.add(total, estimates.shard_sums(pa.array(scores, pa.float64()), decisions))
    whole_scores = [s for scores, _ in shards for s in scores]
    whole_decisions = [d for _, decisions in shards for d in decisions]
    found, expected = estimates.estimates(total), _direct(whole_scores, whole_decisions)
    assert found["scored"] == expected["scored"]
    for name in ("noise_share", "kept_precision", "clean_lost"):
        assert found[name] == pytest.approx(expected[name], abs=1e-6), name
    table = pa.table({"clean_score": pa.array(whole_scores, pa.float64()), "decision": whole_decisions})
    assert estimates.of_table(table) == found  # the report's path: the same numbers from the annotated table


def test_a_chunked_column_is_read_whole():
    column = pa.chunked_array([pa.array([0.25, None]), pa.array([0.75])])
    assert estimates.shard_sums(column, ["drop", "error", "keep"]) == {
        "scored": 2, "score_sum": 1.0, "kept_scored": 1, "kept_score_sum": 0.75, "dropped_scored": 1,
        "dropped_score_sum": 0.25}
    with pytest.raises(ValueError):
        estimates.shard_sums(column, ["keep"])


def test_nothing_scored_or_nothing_kept_is_none_not_a_division_by_zero():
    nothing = estimates.estimates(estimates.shard_sums(pa.array([None], pa.float64()), ["error"]))
    assert nothing == {"noise_share": None, "kept_precision": None, "clean_lost": 0.0, "scored": 0}
    assert estimates.describe(nothing) == "no pair was scored, so nothing is estimated"
    none_kept = estimates.estimates(estimates.shard_sums(pa.array([0.1, 0.3]), ["drop", "drop"]))
    assert none_kept["kept_precision"] is None and none_kept["noise_share"] == pytest.approx(0.8)
    assert "no scored pair kept" in estimates.describe(none_kept)


def test_the_summary_line():
    found = {"noise_share": 0.38212, "kept_precision": 0.9514, "clean_lost": 311.6, "scored": 3000}
    assert estimates.describe(found) == ("estimated noise 38.2% of 3,000 scored pairs; kept pairs expected 95.1% "
                                         "clean; ~312 clean pairs dropped")


def test_a_result_without_recorded_sums_is_read_from_its_annotated_file(tmp_path):
    scores, decisions = [0.9, 0.1, None], ["keep", "drop", "error"]
    pq.write_table(pa.table({"clean_score": pa.array(scores, pa.float64()), "decision": decisions}),
                   tmp_path / "a.parquet")
    recorded = {"estimate_sums": estimates.shard_sums(pa.array([0.5]), ["keep"]), "outputs": []}
    older = {"outputs": [{"path": "a.parquet", "kind": "annotated"}, {"path": "f.parquet", "kind": "filtered"}]}
    total = estimates.empty_sums()
    assert estimates.collect(total, recorded) == [] and total["scored"] == 1
    missing = estimates.collect(total, older)
    assert missing == ["a.parquet"] and total["scored"] == 1  # nothing added: its sums come from the file
    whole = estimates.from_annotated(total, [str(tmp_path / p) for p in missing])
    assert whole["scored"] == 3 and whole["kept_score_sum"] == pytest.approx(1.4) and total["scored"] == 1
