"""Batched device JPEG decode (embed.jpeg_decode): same rows, statuses and reason codes as the CPU path, close
embeddings, every refused image back on the CPU path, and the CPU path's cache key untouched. On CPU the "device"
path runs torchvision's CPU decode_jpeg in batches; the real CUDA path runs only where a GPU is present."""

from __future__ import annotations

import glob
import io

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from bicro_clean.models.device_transform import tensor_transform
from bicro_clean.models.encoders import ImageTransform, load_encoder
from bicro_clean.pipeline import device_decode, embed, resume
from bicro_clean.pipeline.embed import embed_key, embed_shards
from bicro_clean.pipeline.make_shards import make_shards
from bicro_clean.pipeline.parquet_io import shard_fingerprint
from conftest import ShardFactory, image_folder, tiny_config

# Measured on these shards with the tiny encoder (64 px input): per-row cosine between the CPU path (PIL reduced
# DCT decode + PIL resize) and the batched path (full decode + tensor resize) was min 0.99989, mean 0.99999;
# 0.999 leaves ten times that gap.
MIN_COSINE = 0.999
ROW_COLUMNS = ["shard", "key", "status", "reason", "detail", "caption", "width", "height", "url", "uid",
               "image_sha256"]


def _textured(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BICUBIC).convert(mode)


def _jpeg(size: tuple[int, int], seed: int, mode: str = "RGB", **save) -> bytes:
    buffer = io.BytesIO()
    _textured(size, seed, mode).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def _png(size: tuple[int, int], seed: int) -> bytes:
    buffer = io.BytesIO()
    _textured(size, seed).save(buffer, format="PNG")
    return buffer.getvalue()


def _corrupt_jpeg() -> bytes:
    """A JPEG whose header is fine (passes the worker's checks) and whose scan has a bogus marker: libjpeg (so
    torchvision's decode_jpeg) and PIL both refuse it."""
    good = _jpeg((200, 150), 7)
    start = good.index(b"\xff\xda") + 200
    return good[:start] + b"\xff\xc4\x00\x03\x00" + good[start + 5:]


def _sample(key: str, ext: str, data: bytes, caption: str = "") -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data), (f"{key}.txt", (caption or f"a picture called {key}").encode())]


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> str:
    """Two JPEG shards made by make_shards (2 captions per image: repeats) + one of mixed and broken samples."""
    root = tmp_path_factory.mktemp("device-decode")
    images, captions = image_folder(root, 5, (120, 90), lambda i: [f"picture {i}", f"colour {i}"], ext="jpg")
    make_shards(images, captions, root / "shards", shard_size=6)
    truncated = _jpeg((300, 200), 3)[:600]
    members = [*_sample("big", "jpg", _jpeg((500, 375), 1)), *_sample("grey", "jpg", _jpeg((64, 200), 2, "L")),
               *_sample("corrupt", "jpg", _corrupt_jpeg()),
               *_sample("corrupt1b", "jpg", _corrupt_jpeg(), "a repeat in the same chunk"),
               *_sample("png", "png", _png((90, 70), 4)),
               *_sample("pngjpg", "jpg", _png((70, 90), 5)),  # a PNG named .jpg: the header says PNG
               *_sample("truncated", "jpg", truncated), *_sample("cmyk", "jpg", _jpeg((80, 60), 6, "CMYK")),
               *_sample("progressive", "jpg", _jpeg((160, 120), 8, progressive=True)),
               *_sample("html", "jpg", b"<html>not an image</html>"), *_sample("huge", "jpg", _jpeg((600, 400), 9)),
               *_sample("big2", "jpg", _jpeg((500, 375), 1), "the same image again"),
               *_sample("truncated2", "jpg", truncated, "the same cut image again"),
               *_sample("corrupt2", "jpg", _corrupt_jpeg(), "the same corrupt image again")]
    ShardFactory(root / "shards").write("zz-mixed.tar", members)
    return str(root / "shards" / "*.tar")


def _config(spec: str, out, **embed_values):
    # max_image_pixels below the 600x400 "huge" JPEG: image_too_large must come from the header, before decoding
    return tiny_config(spec, out, embed={"batch_size": 5, **embed_values}, reader={"max_image_pixels": 200_000})


def _embed(spec: str, out, **embed_values) -> pl.DataFrame:
    results = embed_shards(_config(spec, out, **embed_values))
    return pl.concat([pl.read_parquet(r.path) for r in results])


def _ok_matrix(frame: pl.DataFrame, column: str) -> np.ndarray:
    return np.stack(frame.filter(pl.col("status") == "ok")[column].to_numpy()).astype(np.float32)


def _assert_same_rows_close_embeddings(cpu: pl.DataFrame, device: pl.DataFrame) -> None:
    assert device.select(ROW_COLUMNS).equals(cpu.select(ROW_COLUMNS))
    np.testing.assert_array_equal(_ok_matrix(device, "text_emb"), _ok_matrix(cpu, "text_emb"))
    cosine = np.sum(_ok_matrix(device, "image_emb") * _ok_matrix(cpu, "image_emb"), axis=1)
    assert cosine.min() > MIN_COSINE, cosine.min()


@pytest.mark.parametrize("workers", [0, 1])
def test_device_path_gives_the_cpu_paths_rows_and_close_embeddings(jpeg_shards, tmp_path, workers):
    cpu = _embed(jpeg_shards, tmp_path / "cpu")
    device = _embed(jpeg_shards, tmp_path / "device", jpeg_decode="device", num_workers=workers)
    _assert_same_rows_close_embeddings(cpu, device)
    reasons = dict(device.filter(pl.col("status") == "error").select("key", "reason").iter_rows())
    assert reasons == {"corrupt": "decode_error", "corrupt1b": "decode_error", "corrupt2": "decode_error",
                       "truncated": "decode_error",
                       "truncated2": "decode_error", "html": "decode_error", "huge": "image_too_large"}
    ok = set(device.filter(pl.col("status") == "ok")["key"])
    assert {"big", "big2", "grey", "png", "pngjpg", "cmyk", "progressive"} <= ok


def test_png_shards_take_the_cpu_path_unchanged(tiny_shards, tmp_path):
    """make_shards PNGs (tests' tiny_shards) are never batched: bit-identical embeddings on either setting."""
    cpu = _embed(str(tiny_shards / "*.tar"), tmp_path / "cpu")
    device = _embed(str(tiny_shards / "*.tar"), tmp_path / "device", jpeg_decode="device")
    assert device.drop("image_emb", "text_emb").equals(cpu.drop("image_emb", "text_emb"))
    np.testing.assert_array_equal(_ok_matrix(device, "image_emb"), _ok_matrix(cpu, "image_emb"))


def test_refused_batches_go_one_by_one_then_to_the_cpu_path(jpeg_shards, tmp_path, monkeypatch):
    """Every batch call fails and every single-image call fails too: each image takes the CPU path, so rows and
    embeddings are exactly the CPU path's, none lost, same order."""
    calls: list[int] = []

    def refuse(self, data):
        calls.append(len(data))
        raise RuntimeError("decoder refuses everything")

    cpu = _embed(jpeg_shards, tmp_path / "cpu")
    monkeypatch.setattr(device_decode.DeviceDecoder, "_decode_jpeg", refuse)
    device = _embed(jpeg_shards, tmp_path / "device", jpeg_decode="device")
    assert any(n > 1 for n in calls) and 1 in calls  # batches first, then one by one
    assert device.drop("image_emb").equals(cpu.drop("image_emb"))
    np.testing.assert_array_equal(_ok_matrix(device, "image_emb"), _ok_matrix(cpu, "image_emb"))


def test_one_bad_image_does_not_cost_its_batch():
    decoder = device_decode.device_decoder(load_encoder("tiny", "cpu"), _config("x", "y").reader, 64)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8)
            for b in (_jpeg((120, 90), 1), _corrupt_jpeg(), _jpeg((64, 200), 2, "L"))]
    out = decoder.decode(data)
    assert out[1] is None and all(o is not None and o.shape == (3, 64, 64) for o in (out[0], out[2]))


def test_tensor_transform_matches_the_pil_transform():
    image = _textured((500, 375), 11)
    pil = ImageTransform(224)(image)
    tensor = tensor_transform(ImageTransform(224))(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert tensor.shape == pil.shape
    # measured: max 0.0175 (about one uint8 step after normalising), mean 0.0026
    assert (tensor - pil).abs().max() < 0.05 and (tensor - pil).abs().mean() < 0.01


def test_default_cpu_key_is_the_old_key(jpeg_shards, tmp_path):
    """auto on a CPU encoder: the embed key computed exactly as before the field existed, and no config hash
    sees the field; the device path gets a key of its own."""
    encoder = load_encoder("tiny", "cpu")
    config = _config(jpeg_shards, tmp_path)
    shard = sorted(glob.glob(jpeg_shards))[0]
    embed_settings = {"encoder": "tiny", "autocast": True, "dtype": "float16"}  # the key's embed part before
    old = resume.stage_key(shard_fingerprint(shard), encoder.describe(), config.reader.digest(), embed_settings,
                           {"jpeg_reduced_decode_side": 64})
    assert embed_key(shard, encoder, config) == old
    assert embed_key(shard, encoder, _config(jpeg_shards, tmp_path, jpeg_decode="cpu")) == old
    device = _config(jpeg_shards, tmp_path, jpeg_decode="device")
    assert embed_key(shard, encoder, device) != old
    assert resume.config_hash(device) == resume.config_hash(config) and device.embed.digest() == config.embed.digest()


def test_default_path_never_touches_the_batched_decoder(jpeg_shards, tmp_path, monkeypatch):
    expected = _embed(jpeg_shards, tmp_path / "explicit", jpeg_decode="cpu")

    def forbidden(*args, **kwargs):
        raise AssertionError("the batched decoder ran on the default CPU path")

    monkeypatch.setattr(embed, "resolve_chunk", forbidden)
    monkeypatch.setattr(embed, "batchable_jpeg", forbidden)
    monkeypatch.setattr(device_decode.DeviceDecoder, "_decode_jpeg", forbidden)
    default = _embed(jpeg_shards, tmp_path / "default")
    assert default.equals(expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the nvJPEG path needs a CUDA device")
def test_cuda_path_matches_the_cpu_path(jpeg_shards, tmp_path):
    cpu = _embed(jpeg_shards, tmp_path / "cpu", device="cpu")
    encoder = load_encoder("tiny", "cuda")
    assert device_decode.jpeg_path("auto", encoder) == "device"
    results = embed_shards(_config(jpeg_shards, tmp_path / "cuda", device="cuda"), encoder)
    cuda = pl.concat([pl.read_parquet(r.path) for r in results])
    assert cuda.select(ROW_COLUMNS).equals(cpu.select(ROW_COLUMNS))
    cosine = np.sum(_ok_matrix(cuda, "image_emb") * _ok_matrix(cpu, "image_emb"), axis=1)
    assert cosine.min() > MIN_COSINE, cosine.min()


def test_a_refused_image_keeps_the_rows_url_and_uid():
    from bicro_clean.pipeline.device_decode import _fail_row
    from bicro_clean.pipeline.shards import ReadIssue

    rows = [{"key": "k", "status": "ok", "url": "http://x/k.jpg", "uid": "ab" * 16}]
    issue = ReadIssue("s.tar", "k", "decode_error", "nvJPEG and PIL refused it")  # the fallback has no .json
    _fail_row(rows, 0, issue, lambda i: {"key": i.key, "status": "error", "reason": i.reason, "url": i.url,
                                         "uid": i.uid})
    assert rows[0]["status"] == "error" and rows[0]["url"] == "http://x/k.jpg" and rows[0]["uid"] == "ab" * 16
