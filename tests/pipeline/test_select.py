"""Decision policy: threshold and keep-fraction rules, tie breaking, a reason for every row."""

import numpy as np
import pytest

from bicro_clean.pipeline import select


def _decide(values, ok=None, errors=None, cutoff=None, column="clean_score", threshold=0.5, shards=None, keys=None):
    n = len(values)
    ok = np.ones(n, bool) if ok is None else np.asarray(ok)
    errors = np.array([None] * n, dtype=object) if errors is None else np.asarray(errors, dtype=object)
    shards = np.array(["s"] * n) if shards is None else np.asarray(shards)
    keys = np.array([f"k{i}" for i in range(n)]) if keys is None else np.asarray(keys)
    return select.decide(ok, errors, np.asarray(values, dtype=float), shards, keys, column=column,
                         threshold=threshold, cutoff=cutoff)


def test_threshold_keeps_at_or_above_and_names_every_reason():
    decision, reason = _decide([0.9, 0.5, 0.4, 0.2, np.nan], ok=[True, True, True, True, False],
                               errors=[None, None, None, None, "decode_error"])
    assert decision.tolist() == ["keep", "keep", "drop", "drop", "error"]
    assert reason.tolist() == ["kept", "kept", "low_clean_score", "low_clean_score", "decode_error"]


@pytest.mark.parametrize("column", ["soft_label", "match_score", "encoder_cosine"])
def test_the_drop_reason_follows_the_rule_the_user_chose(column):
    _, reason = _decide([0.1, 0.1], column=column, threshold=0.3)
    assert reason.tolist() == [f"low_{column}"] * 2


def test_error_rows_are_never_kept_whatever_their_value():
    decision, reason = _decide([0.99], ok=[False], errors=["missing_caption"])
    assert (decision[0], reason[0]) == ("error", "missing_caption")


def test_keep_fraction_floor_and_order():
    values = np.array([0.1, 0.9, 0.5, 0.7, np.nan])
    cutoff = select.cutoff_in_memory(values, np.array(["s"] * 5), np.array([f"k{i}" for i in range(5)]), 0.5)
    assert (cutoff.n_scored, cutoff.n_keep, cutoff.value) == (4, 2, pytest.approx(0.7))
    decision, reason = _decide(values, cutoff=cutoff, ok=[True] * 4 + [False], errors=[None] * 4 + ["x"])
    assert decision.tolist() == ["drop", "keep", "drop", "keep", "error"]
    assert reason[0] == "below_keep_fraction"


def test_keep_fraction_ties_broken_by_shard_then_key():
    values = np.array([0.5, 0.5, 0.5, 0.5, 0.9])
    shards = np.array(["b", "a", "a", "b", "z"])
    keys = np.array(["1", "2", "1", "0", "9"])
    cutoff = select.cutoff_in_memory(values, shards, keys, 0.6)  # 3 of 5: the 0.9 plus two tied rows
    assert (cutoff.shard, cutoff.key) == ("a", "2")
    kept = select.keep_by_cutoff(values, shards, keys, cutoff)
    assert kept.tolist() == [False, True, True, False, True]
    assert kept.sum() == cutoff.n_keep


def test_cutoff_is_the_same_computed_per_shard_or_all_at_once():
    rng = np.random.default_rng(0)
    values = np.round(rng.random(40), 1)  # many ties
    shards, keys = np.repeat(["s0", "s1", "s2", "s3"], 10), np.array([f"{i:03d}" for i in range(40)])
    whole = select.cutoff_in_memory(values, shards, keys, 0.3)
    cut = select.cut_value(values, 0.3)
    ties = [(shards[i], keys[i]) for part in np.array_split(np.arange(40), 4) for i in part if values[i] == cut]
    assert select.cutoff_from_columns(values, ties, 0.3) == whole
    kept = np.concatenate([select.keep_by_cutoff(values[p], shards[p], keys[p], whole)
                           for p in np.array_split(np.arange(40), 4)])
    assert kept.sum() == whole.n_keep == 12


def test_keep_fraction_too_small_keeps_nothing():
    cutoff = select.cutoff_in_memory(np.array([0.3, 0.2]), np.array(["s", "s"]), np.array(["a", "b"]), 0.4)
    assert cutoff.n_keep == 0
    decision, reason = _decide([0.3, 0.2], cutoff=cutoff)
    assert decision.tolist() == ["drop", "drop"] and set(reason) == {"below_keep_fraction"}


def test_drop_details_explain_the_rule():
    reason = np.array(["low_soft_label", "kept"], dtype=object)
    details = select.drop_details(reason, np.array([0.3, 0.9]), column="soft_label", threshold=0.5)
    assert details == ["soft_label=0.3 < threshold=0.5", None]


def test_unknown_column_is_rejected():
    with pytest.raises(ValueError, match="select.column"):
        select.check_column("clip_score")
