"""The report's scan without a Python step per row: gallery picks ranked in numpy first are the picks of ranking
every row in Python, ties included; the priorities are the seeded BLAKE2b digests row by row."""

import heapq

import numpy as np
import pytest

from bicro_clean.pipeline.report import scan


def _rows(n, rng):
    return {"shard": np.array([f"s{i % 3}" for i in range(n)], dtype=object),
            "key": np.array([f"{int(k):04d}" for k in rng.permutation(n)], dtype=object),
            "decision": np.array(rng.choice(["keep", "drop", "error"], n), dtype=object),
            "clean_score": np.round(rng.random(n), 1),  # heavy ties
            "p_clean": np.round(rng.random(n), 1),
            "soft_label": rng.choice([0.0, 0.5, 1.0], n),
            "truth_clean": np.array(rng.choice([True, False, None], n), dtype=object)}


def _every_row_in_python(rows, rule, prio):
    """The picks as ranking every row with heapq (what the scan did row by row)."""
    shard, key, value = rows["shard"], rows["key"], rows[rule.column]
    second = rows["p_clean"] if rule.column == "soft_label" else np.zeros(len(value))
    scored = np.flatnonzero((rows["decision"] != "error") & ~np.isnan(value) & ~np.isnan(second))
    kept = np.flatnonzero(rows["decision"] == "keep")
    dropped = np.flatnonzero(rows["decision"] == "drop")
    truth = rows["truth_clean"]
    rank = {int(i): (int(prio[i]), shard[i], key[i]) for i in range(len(value))}
    pick = lambda index, sort_key: [(sort_key(i), scan._row(rows, i))  # noqa: E731
                                    for i in heapq.nsmallest(scan.GALLERY_SIZE, index, key=sort_key)]
    return {"lowest": pick(scored, lambda i: (value[i], second[i], *rank[i])),
            "borderline": pick(scored, lambda i: (abs(value[i] - rule.threshold), *rank[i])),
            "random_kept": pick(kept, lambda i: rank[i]),
            "random_dropped": pick(dropped, lambda i: rank[i]),
            "kept_noisy": pick([i for i in kept if truth[i] is False], lambda i: rank[i]),
            "dropped_clean": pick([i for i in dropped if truth[i] is True], lambda i: rank[i])}


@pytest.mark.parametrize("column", ["clean_score", "soft_label"])
@pytest.mark.parametrize("tied_priorities", [False, True])
def test_picks_ranked_in_numpy_equal_ranking_every_row(column, tied_priorities):
    rng = np.random.default_rng(1)
    rows = _rows(500, rng)
    prio = scan.priorities(rows, seed=0)
    if tied_priorities:  # force the (astronomically rare) equal priorities: shard and key must break them
        prio = prio % np.uint64(4)
    rule = scan.Rule(column, 0.5, False)
    assert repr(scan.file_picks(rows, rule, prio)) == repr(_every_row_in_python(rows, rule, prio))


def test_priorities_are_the_seeded_digests_row_by_row():
    rows = _rows(50, np.random.default_rng(2))
    want = [scan._priority(7, s, k) for s, k in zip(rows["shard"], rows["key"])]
    assert scan.priorities(rows, seed=7).tolist() == want


def test_truth_masks():
    known, clean = scan.truth_masks(np.array([True, False, None, True], dtype=object))
    assert known.tolist() == [True, True, False, True] and clean.tolist() == [True, False, False, True]


# ---------------------------------------------------------------- the scan mapped over groups of files


@pytest.mark.parametrize("options", [dict(truth=True), dict(truth=False, keep_fraction=None, seed=1)])
def test_report_from_group_partials_is_the_page_of_one_pass(tmp_path, monkeypatch, options):
    """Any grouping of the annotated files (in order), scanned apart and merged, gives the same page bytes as one
    pass, and each partial stays small: at most GALLERY_SIZE picks per gallery, at most SAMPLE pairs (made small
    here so that the groups trim their samples)."""
    from report_fixture import Options, build_run, config_of

    from bicro_clean.pipeline import report
    from bicro_clean.pipeline.report import compare
    from bicro_clean.pipeline.shard_groups import split_even

    monkeypatch.setattr(compare, "SAMPLE", 10)
    monkeypatch.setattr(scan, "SAMPLE", 10)
    out = build_run(tmp_path, Options(images=48, **options))  # 8 annotated files of 12 pairs
    config, manifest_path = config_of(out), str(out / "manifest.json")
    manifest = report._manifest(config, manifest_path)
    one_pass = report.build_report(config, manifest)
    paths, setup = report.report_plan(config, manifest_path)
    assert len(paths) == 8
    for parts in (1, 2, 3, 8):
        partials = [report.report_scan(group, setup) for group in split_even(paths, parts)]
        for part in partials:
            assert all(len(picks) <= scan.GALLERY_SIZE for picks in part.picks.values())
            assert len(part.stats.pairs.priority) <= 10
        assert report.build_report(config, manifest, (setup, partials)) == one_pass, parts
