"""The fit sample is read as a sample: the same rows as reading every embeddings file whole, from the footers'
recorded counts and only the row groups that hold sampled rows."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bicro_clean.pipeline import fit, fit_sample
from bicro_clean.pipeline.parquet_io import METADATA_KEY
from bicro_clean.pipeline.score import fixed_list_matrix, pair_key

DIM = 4


def _embeddings(path, shard, rows, errors, rng, record_counts=True):
    status = np.array(["ok"] * rows, dtype=object)
    status[rng.choice(rows, errors, replace=False)] = "decode_error"
    vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM)
    table = pa.table({"shard": [shard] * rows, "key": [f"{i:05d}" for i in range(rows)],
                      "status": status.tolist(), "image_emb": emb, "text_emb": emb})
    meta = {"stage": "embed", "encoder": {"spec": "tiny"}, "key": shard}
    if record_counts:
        meta.update(samples=rows, errors=errors)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path, row_group_size=50)
    return str(path)


def _read_whole(paths, sample, seed):
    """What the fit read before: every file whole, its ok rows, then the sampled positions."""
    counts = [int(pc.sum(pc.equal(pq.read_table(p)["status"], "ok")).as_py() or 0) for p in paths]
    image, keys = [], []
    for path, positions in zip(paths, fit.sample_positions(counts, sample, seed)):
        table = pq.read_table(path)
        ok = table.filter(pc.equal(table["status"], "ok")).take(pa.array(positions, pa.int64()))
        image.append(fixed_list_matrix(ok["image_emb"]))
        keys += [pair_key(s, k) for s, k in zip(ok["shard"].to_pylist(), ok["key"].to_pylist())]
    return np.concatenate(image), keys


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(400, 0), (0, 0), (333, 40), (120, 120), (401, 7), (260, 0)]
    return [_embeddings(tmp_path / f"{i}.parquet", f"s{i}", n, e, rng, record_counts=i != 4)
            for i, (n, e) in enumerate(sizes)]


@pytest.mark.parametrize("sample", [0, 37, 900, 1347, 5000])  # 0 and 5000: every ok row
def test_the_sample_is_the_same_rows_as_reading_every_file_whole(files, sample):
    image, text, keys = fit.load_fit_pairs(files, sample, seed=3)
    want_image, want_keys = _read_whole(files, sample, 3)
    assert keys == want_keys
    np.testing.assert_array_equal(image, want_image)
    np.testing.assert_array_equal(text, want_image)


def test_fewer_than_two_pairs_is_the_same_error(files):
    with pytest.raises(ValueError, match="fewer than 2"):
        fit.load_fit_pairs(files, 1, seed=3)


def test_only_the_row_groups_holding_sampled_rows_are_read(files, monkeypatch):
    read = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, groups, *args, **kwargs):
        read.append(list(groups))
        return original(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    footers = fit_sample.read_footers(files)
    assert [f.ok for f in footers] == [400, 0, 293, 0, 394, 260]
    _, _, keys = fit.load_fit_pairs(files, 6, seed=1, footers=footers)
    assert len(keys) == 6 and sum(len(g) for g in read) <= 6
    total_groups = sum(len(f.row_groups) for f in footers)
    assert sum(len(g) for g in read) < total_groups
