"""Embedding stage: per-shard Parquet, counts, error rows, cache skip and invalidation."""

import csv
import io
import os
import tarfile

import numpy as np
import polars as pl
import pytest
import torch
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
    assert frame.schema["image_emb"] == pl.Array(pl.Float16, 64)  # embed.dtype: float16 by default
    ok = frame.filter(pl.col("status") == "ok")
    norms = np.linalg.norm(np.stack(ok["image_emb"].to_numpy()).astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    assert errors["image_emb"].null_count() == 2


def test_embeddings_are_written_in_small_row_groups(shard_dir, tmp_path, monkeypatch):
    """The fit reads only the row groups that hold its sample (pipeline/fit_sample.py): the embed stage caps them."""
    import pyarrow.parquet as pq

    from bicro_clean.pipeline import embed

    monkeypatch.setattr(embed, "EMBED_ROW_GROUP_ROWS", 2)  # the shards here hold 5 pairs; the real cap is 1,024
    for result in embed_shards(_config(shard_dir, tmp_path)):
        footer = pq.ParquetFile(result.path).metadata
        sizes = [footer.row_group(i).num_rows for i in range(footer.num_row_groups)]
        assert sum(sizes) == result.samples and max(sizes) <= 2, sizes


def test_workers_give_the_same_rows_as_in_process(shard_dir, tmp_path):
    embed_shards(_config(shard_dir, tmp_path / "a"))
    embed_shards(_config(shard_dir, tmp_path / "b", num_workers=2))
    a = pl.read_parquet(str(tmp_path / "a" / "embeddings" / "*.parquet"))
    b = pl.read_parquet(str(tmp_path / "b" / "embeddings" / "*.parquet"))
    assert a.select("shard", "key", "status").equals(b.select("shard", "key", "status"))
    np.testing.assert_array_equal(np.stack(a["text_emb"].drop_nulls().to_numpy()),
                                  np.stack(b["text_emb"].drop_nulls().to_numpy()))


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


def test_float16_storage_is_float32_rounded_and_readers_get_float32(shard_dir, tmp_path):
    from bicro_clean.pipeline.fit import load_fit_pairs
    from bicro_clean.pipeline.parquet_io import read_columns
    from bicro_clean.pipeline.score import fixed_list_matrix

    half = embed_shards(_config(shard_dir, tmp_path / "half"))
    full = embed_shards(_config(shard_dir, tmp_path / "full", dtype="float32"))
    for h, f in zip(half, full):
        a, b = read_columns(h.path, ["image_emb", "text_emb"]), read_columns(f.path, ["image_emb", "text_emb"])
        assert str(a.schema.field("image_emb").type.value_type) == "halffloat"
        assert str(b.schema.field("text_emb").type.value_type) == "float"
        for name in ("image_emb", "text_emb"):
            assert a[name].is_null().to_pylist() == b[name].is_null().to_pylist()
            got, want = fixed_list_matrix(a[name]), fixed_list_matrix(b[name])
            assert got.dtype == want.dtype == np.float32
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))  # round to nearest
    image, text, keys = load_fit_pairs([r.path for r in half], 0, 0)
    assert image.dtype == text.dtype == np.float32 and len(keys) == image.shape[0] == 13
    sizes = [sum(os.path.getsize(r.path) for r in rs) for rs in (half, full)]
    assert sizes[0] < sizes[1]


def test_storage_dtype_is_part_of_the_cache_key(shard_dir, tmp_path):
    assert not any(r.cached for r in embed_shards(_config(shard_dir, tmp_path, dtype="float32")))
    assert all(r.cached for r in embed_shards(_config(shard_dir, tmp_path, dtype="float32")))
    assert not any(r.cached for r in embed_shards(_config(shard_dir, tmp_path)))
    frame = pl.read_parquet(str(tmp_path / "embeddings" / "*.parquet"))
    assert frame.schema["text_emb"] == pl.Array(pl.Float16, 64)


def test_fixed_list_matrix_of_a_sliced_float16_column():
    import pyarrow as pa

    from bicro_clean.pipeline.score import fixed_list_matrix

    values = np.arange(12, dtype=np.float16) / 8
    column = pa.FixedSizeListArray.from_arrays(pa.array(values), 3).slice(1, 2)
    got = fixed_list_matrix(pa.chunked_array([column]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values.astype(np.float32).reshape(4, 3)[1:3])


def test_big_jpegs_are_embedded_from_the_reduced_decode(tmp_path):
    import torch

    from bicro_clean.models.encoders import load_encoder
    from bicro_clean.pipeline.decode import read_shard
    from bicro_clean.pipeline.parquet_io import read_columns
    from bicro_clean.pipeline.score import fixed_list_matrix

    rng = np.random.default_rng(0)
    members = {}
    for i, size in enumerate([(640, 400), (90, 70)]):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG")
        members.update({f"p{i}.jpg": buffer.getvalue(), f"p{i}.txt": b"noise"})
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "big.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    encoder = load_encoder("tiny", "cpu")
    config = CleanConfig(input=str(tmp_path / "in" / "*.tar"), output=str(tmp_path / "out"),
                         embed={"encoder": "tiny", "num_workers": 0, "progress": False, "dtype": "float32"})
    [result] = embed_shards(config, encoder=encoder)
    samples = list(read_shard(str(tmp_path / "in" / "big.tar"), config.reader, encoder.decode_side()))
    assert [s.image.size for s in samples] == [(160, 100), (90, 70)]  # 400 // 64 = 6: scale 1/4
    table = read_columns(result.path, ["width", "height", "image_emb"])
    assert table["width"].to_pylist() == [640, 90]  # the full size is what the rows record
    transform = encoder.image_transform()
    want = encoder.encode_images(torch.stack([transform(s.image) for s in samples])).numpy()
    np.testing.assert_allclose(fixed_list_matrix(table["image_emb"]), want, atol=1e-6)


def test_captions_are_tokenised_with_the_images_in_the_decode_stream(shard_dir, tmp_path):
    from bicro_clean.models.encoders import load_encoder
    from bicro_clean.pipeline.embed import _loader

    encoder = load_encoder("tiny", "cpu")
    calls = []
    encoder.encode_texts = lambda texts: calls.append(texts)  # the main process must not tokenise
    config = _config(shard_dir, tmp_path)
    chunks = list(_loader(sorted(str(p) for p in shard_dir.glob("*.tar")), encoder, config))
    for chunk in chunks:
        ok = [r["caption"] for r in chunk.rows if r["status"] == "ok"]
        assert (chunk.tokens is None) == (not ok)
        if ok:
            assert torch.equal(chunk.tokens, encoder.tokenizer(ok))
    embed_shards(config, encoder=encoder)
    assert calls == []


def test_default_workers_are_the_usable_cores():
    from bicro_clean.pipeline.config import EmbedConfig

    assert EmbedConfig().num_workers == len(os.sched_getaffinity(0))
    assert EmbedConfig(num_workers=0).num_workers == 0


def test_chunks_are_pinned_only_for_a_cuda_encoder(monkeypatch):
    from types import SimpleNamespace

    from bicro_clean.models.tokens import TextTokens
    from bicro_clean.pipeline.embed import Chunk, pins_memory

    assert not pins_memory(SimpleNamespace(device=torch.device("cpu")))
    assert not pins_memory(SimpleNamespace())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pins_memory(SimpleNamespace(device=torch.device("cuda", 0)))
    # what the DataLoader's pin thread calls: every tensor of the chunk page-locked, the rest untouched
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: (pinned.append(tuple(t.shape)), t.clone())[1])
    tokens = TextTokens(np.array([1, 0]), [{"input_ids": torch.zeros(2, 5), "attention_mask": torch.ones(2, 5)}])
    chunk = Chunk("s", [{"key": "a"}], torch.zeros(1, 3, 8, 8), last=True, tokens=tokens).pin_memory()
    assert sorted(pinned) == [(1, 3, 8, 8), (2, 5), (2, 5)]
    assert chunk.last and chunk.rows == [{"key": "a"}] and list(chunk.tokens.order) == [1, 0]
    assert Chunk("s", [], None, tokens=torch.ones(2, 4)).pin_memory().tokens.shape == (2, 4)
