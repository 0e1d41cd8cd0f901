"""The select stage's run-wide values as a bounded map-reduce: the same cutoff and repeated keys as ranking and
counting every row in memory, also when the budgets force histogram passes and spilled hash buckets."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bicro_clean.pipeline import run_wide_cutoff, run_wide_keys, select


def _score_files(root, rng, shards=6, rows=200, round_to=2, nan_share=0.1):
    paths, shard_ids, keys = [], [], []
    for s in range(shards):
        shard = f"shard-{(s * 7) % shards:03d}"  # file order is not shard order
        clean = np.round(rng.random(rows), round_to)  # many exact ties
        clean[rng.random(rows) < nan_share] = np.nan  # error rows
        soft = rng.choice([0.0, 0.5, 1.0], rows).astype(np.float32)
        key = [f"{int(k):06d}" for k in rng.permutation(10 * rows)[:rows]]
        table = pa.table({"shard": [shard] * rows, "key": key,
                          "status": ["ok" if np.isfinite(v) else "error" for v in clean],
                          "clean_score": pa.array(clean, pa.float64(), from_pandas=True),
                          "soft_label": pa.array(np.where(np.isnan(clean), np.nan, soft), pa.float32(),
                                                 from_pandas=True)})
        path = root / f"{s}.parquet"
        pq.write_table(table, path)
        paths.append(str(path))
        shard_ids += [shard] * rows
        keys += key
    return paths, shard_ids, keys


def _in_memory(paths, column, fraction):
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    values = run_wide_cutoff.stored_values(table[column])
    return select.cutoff_in_memory(values, np.asarray(table["shard"].to_pylist()),
                                   np.asarray(table["key"].to_pylist()), fraction)


@pytest.mark.parametrize("collect_rows", [1 << 22, 50])  # 50: every search goes through histogram passes
@pytest.mark.parametrize("column", ["clean_score", "soft_label"])
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.3, 0.5, 0.77, 1.0])
def test_cutoff_equals_ranking_every_row_in_memory(tmp_path, monkeypatch, collect_rows, column, fraction):
    monkeypatch.setattr(run_wide_cutoff, "COLLECT_ROWS", collect_rows)
    paths, _, _ = _score_files(tmp_path, np.random.default_rng(len(column)))
    assert select.global_cutoff(paths, column, fraction) == _in_memory(paths, column, fraction)


def test_cutoff_with_negative_values_and_infinities(tmp_path, monkeypatch):
    monkeypatch.setattr(run_wide_cutoff, "COLLECT_ROWS", 3)
    values = np.array([-1.5, -0.0, 0.0, 2.0, -np.inf, np.inf, 0.25, -1.5, np.nan, 0.0])
    paths = []
    for i in range(2):
        table = pa.table({"shard": [f"s{i}"] * 10, "key": [f"k{j}" for j in range(10)],
                          "clean_score": pa.array(values[::-1] if i else values, pa.float64())})
        paths.append(str(tmp_path / f"{i}.parquet"))
        pq.write_table(table, paths[-1])
    for fraction in (0.1, 0.4, 0.5, 0.6, 0.9, 1.0):
        got, want = select.global_cutoff(paths, "clean_score", fraction), _in_memory(paths, "clean_score", fraction)
        assert (got.n_keep, got.n_scored, got.value, got.shard, got.key) == \
               (want.n_keep, want.n_scored, want.value + 0.0, want.shard, want.key)


def test_order_keys_sort_like_the_floats():
    values = np.array([np.inf, -np.inf, -2.0, -1e-300, 0.0, 1e-300, 3.5, np.float32(0.1), -7.25])
    keys = run_wide_cutoff.order_keys(values)
    assert np.array_equal(np.argsort(keys, kind="stable"), np.argsort(values, kind="stable"))
    assert [run_wide_cutoff.key_value(k) for k in keys] == values.tolist()


def _embedding_files(root, keys_per_file, status=None):
    paths = []
    for i, keys in enumerate(keys_per_file):
        state = status[i] if status else ["ok"] * len(keys)
        pq.write_table(pa.table({"key": keys, "status": state}), root / f"e{i}.parquet")
        paths.append(str(root / f"e{i}.parquet"))
    return paths


@pytest.mark.parametrize("spill_rows", [1 << 22, 7])  # 7: the hash pairs go through bucket files on disk
def test_repeated_keys_are_the_keys_of_ok_rows_in_more_than_one_shard(tmp_path, monkeypatch, spill_rows):
    monkeypatch.setattr(run_wide_keys, "SPILL_ROWS", spill_rows)
    rng = np.random.default_rng(3)
    files = [[f"{k:05d}" for k in rng.choice(3000, 400, replace=False)] for _ in range(8)]
    files.append(["", "é-ünïcode", "x" * 300])  # empty, multi-byte and long keys
    files.append(["é-ünïcode", "x" * 300, "y" * 300])
    status = [["ok"] * len(f) for f in files]
    status[0][:50] = ["decode_error"] * 50  # error rows never count
    paths = _embedding_files(tmp_path, files, status)
    seen = Counter(k for f, s in zip(files, status) for k in {k for k, st in zip(f, s) if st == "ok"})
    expected = frozenset(k for k, n in seen.items() if n > 1)
    assert len(expected) > 100
    assert select.duplicate_keys(paths) == expected


def test_a_hash_collision_never_makes_a_repeated_key(tmp_path, monkeypatch):
    monkeypatch.setattr(run_wide_keys, "key_hashes", lambda keys: np.zeros(len(keys), np.uint64))  # all collide
    paths = _embedding_files(tmp_path, [["a", "b"], ["c", "b"], ["d"]])
    assert select.duplicate_keys(paths) == frozenset({"b"})


def test_key_hashes_are_equal_for_equal_strings_only():
    keys = pa.array([f"{i:011d}" for i in range(100_000)] + ["", "a", "a"])
    hashes = run_wide_keys.key_hashes(keys)
    assert len(np.unique(hashes[:-1])) == 100_002 and hashes[-1] == hashes[-2]
    chunked = pa.chunked_array([keys.slice(0, 5), keys.slice(5)])
    assert np.array_equal(run_wide_keys.key_hashes(chunked), hashes)
    assert np.array_equal(run_wide_keys.key_hashes(keys.cast(pa.large_string())), hashes)


def test_no_run_wide_value_for_no_files():
    assert select.duplicate_keys([]) == frozenset()
    assert select.global_cutoff([], "clean_score", 0.5) == select.Cutoff(0, 0)
