"""Embedding stage: per-shard Parquet, counts, error rows, cache skip and invalidation."""

import csv
import io
import tarfile

import numpy as np
import polars as pl
import pytest
from PIL import Image

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.embed import embed_shards
from bicro_clean.pipeline.make_shards import make_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    images.mkdir()
    with open(root / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for i in range(6):
            Image.new("RGB", (32, 24), (40 * i, 255 - 40 * i, 90)).save(images / f"im{i}.jpg")
            writer.writerow([f"im{i}.jpg", f"a picture number {i}"])
            writer.writerow([f"im{i}.jpg", f"another caption {i}"])
    make_shards(images, root / "captions.csv", root / "shards", shard_size=5)
    _add_broken_shard(root / "shards" / "99999.tar")
    return root / "shards"


def _add_broken_shard(path):
    """One good sample, one undecodable image, one sample without caption."""
    good = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(good, format="PNG")
    members = {"a.png": good.getvalue(), "a.txt": b"a red square", "b.jpg": b"<html>not an image</html>",
               "b.txt": b"broken", "c.jpg": good.getvalue()}
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _config(shard_dir, out, **embed):
    return CleanConfig(input=str(shard_dir / "*.tar"), output=str(out),
                       embed={"encoder": "tiny", "num_workers": 0, "batch_size": 4, "progress": False, **embed})


def test_every_sample_lands_in_parquet(shard_dir, tmp_path):
    results = embed_shards(_config(shard_dir, tmp_path))
    assert len(results) == 4  # 12 pairs / 5 per shard = 3 shards + the broken one
    frame = pl.read_parquet(str(tmp_path / "embeddings" / "*.parquet"))
    assert frame.height == 12 + 3 == sum(r.samples for r in results)
    assert sum(r.embedded for r in results) + sum(r.errors for r in results) == frame.height
    errors = frame.filter(pl.col("status") == "error")
    assert sorted(errors["reason"].to_list()) == ["decode_error", "missing_caption"]
    assert frame.schema["image_emb"] == pl.Array(pl.Float32, 64)
    ok = frame.filter(pl.col("status") == "ok")
    norms = np.linalg.norm(np.stack(ok["image_emb"].to_numpy()), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert errors["image_emb"].null_count() == 2


def test_workers_give_the_same_rows_as_in_process(shard_dir, tmp_path):
    embed_shards(_config(shard_dir, tmp_path / "a"))
    embed_shards(_config(shard_dir, tmp_path / "b", num_workers=2))
    a = pl.read_parquet(str(tmp_path / "a" / "embeddings" / "*.parquet"))
    b = pl.read_parquet(str(tmp_path / "b" / "embeddings" / "*.parquet"))
    assert a.select("shard", "key", "status").equals(b.select("shard", "key", "status"))
    np.testing.assert_allclose(np.stack(a["text_emb"].drop_nulls().to_numpy()),
                               np.stack(b["text_emb"].drop_nulls().to_numpy()), atol=1e-5)


def test_rerun_skips_cached_shards_and_config_change_invalidates(shard_dir, tmp_path):
    first = embed_shards(_config(shard_dir, tmp_path))
    assert not any(r.cached for r in first)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "embeddings").iterdir()}
    second = embed_shards(_config(shard_dir, tmp_path))
    assert all(r.cached for r in second)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "embeddings").iterdir()}
    changed = CleanConfig(input=str(shard_dir / "*.tar"), output=str(tmp_path),
                          reader={"max_caption_bytes": 10},
                          embed={"encoder": "tiny", "num_workers": 0, "progress": False})
    third = embed_shards(changed)
    assert not any(r.cached for r in third)
    frame = pl.read_parquet(str(tmp_path / "embeddings" / "*.parquet"))
    assert "caption_too_long" in frame["reason"].to_list()


def test_repeated_images_are_encoded_once_per_shard(shard_dir, tmp_path):
    from bicro_clean.models.encoders import load_encoder

    encoder = load_encoder("tiny", "cpu")
    encoded = []
    original = encoder.encode_images
    encoder.encode_images = lambda pixels: (encoded.append(len(pixels)), original(pixels))[1]
    embed_shards(_config(shard_dir, tmp_path), encoder=encoder)
    frame = pl.read_parquet(str(tmp_path / "embeddings" / "*.parquet")).filter(pl.col("status") == "ok")
    distinct = frame.select("shard", "image_sha256").unique().height
    assert sum(encoded) == distinct < frame.height  # 2 captions per image: fewer model calls than rows
    for _, group in frame.group_by("shard", "image_sha256"):
        vectors = np.stack(group["image_emb"].to_numpy())
        np.testing.assert_array_equal(vectors, np.repeat(vectors[:1], len(vectors), axis=0))
