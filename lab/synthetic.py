"""Synthetic data for benchmarks and the load test, when no real data is at hand (or too little of it).

Two makers, one per kind of data:
  `synthetic_pairs`: CLIP-like L2-normalised image/text embedding pairs with mismatched captions (fit, score);
  `write_shards`: img2dataset-style WebDataset shards (KEY.jpg, KEY.txt, optionally KEY.json with the truth),
      parameterised by `ShardSpec` so every benchmark gets what it measures: photo-like JPEGs of any size, a
      picture per pair or a small pool of them, every pair's bytes distinct or not, a mismatched-caption rate;
plus `write_embeddings`, the embed stage's cached Parquet for a synthetic shard (scoring from cached embeddings).
"""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

DIM = 512  # CLIP ViT-B/32's embedding size
NOISE_RATE = 0.2
PHOTO_SIZE = (500, 375)  # Flickr8k's typical photo (width, height)


def synthetic_pairs(n: int, seed: int, noise_rate: float = NOISE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image/text embeddings sharing a latent per pair; `noise_rate` of texts belong elsewhere.

    The per-pair noise scale spreads clean cosines over ~0.1-0.5 (CLIP-like): with one scale every clean pair
    has zero hinge loss and the loss mixture has nothing to separate, so almost nothing becomes an anchor.
    """
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, DIM), dtype=np.float32)
    scale = rng.uniform(1.0, 2.5, (n, 1)).astype(np.float32)
    image = latent + scale * rng.standard_normal((n, DIM), dtype=np.float32)
    text = latent + scale * rng.standard_normal((n, DIM), dtype=np.float32)
    noisy = np.flatnonzero(rng.random(n) < noise_rate)
    text[noisy] = text[rng.permutation(noisy)]  # mismatched captions, as the NCR noise protocol makes them
    for x in (image, text):
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return image, text


@dataclass(frozen=True)
class ShardSpec:
    """What `write_shards` makes. Defaults: one photo-sized picture per pair, every caption true, no KEY.json."""

    pairs: int
    shard_pairs: int
    image_size: tuple[int, int] = PHOTO_SIZE  # (width, height)
    pictures: int = 0  # distinct pictures, pair i shows picture i % pictures; 0 = one per pair
    distinct_bytes: bool = False  # a per-pair JPEG comment: unique bytes (and sha256) even from a small pool
    noise_rate: float = 0.0  # this share of captions describe another picture (needs >= 2 pictures)
    truth: bool = False  # KEY.json with {"key", "truth_clean"}, as make-shards --noise-rate writes it
    quality: int = 90
    seed: int = 0


@dataclass
class SyntheticShard:
    """One written shard: its samples' keys, captions and truth, in tar order (handed to `on_shard`)."""

    index: int
    path: Path
    keys: list[str]
    captions: list[str]
    clean: list[bool]


def photo_jpeg(seed: int, picture: int, size: tuple[int, int], quality: int) -> bytes:
    """A photo-like JPEG (a smooth random field plus grain, ~Flickr file sizes), the same for the same arguments.

    Pure noise would make every JPEG several times larger and slower to decode than a photo.
    """
    from PIL import Image

    rng = np.random.default_rng([seed, picture])
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize(size, Image.BICUBIC)
    grain = rng.integers(-12, 13, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(smooth, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _with_comment(jpeg: bytes, pair: int) -> bytes:
    """The JPEG with a COM segment naming the pair: still valid, its bytes (and sha256) unique, so the embed stage
    encodes every pair's image as it would for a real crawl, without encoding 200k distinct pictures here."""
    comment = f"pair {pair}".encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(directory: Path, spec: ShardSpec,
                 on_shard: Callable[[SyntheticShard], None] | None = None) -> list[Path]:
    """`directory/NNNNN.tar` shards of `spec.shard_pairs` pairs (img2dataset keys); `on_shard` sees each one
    as it is written, so a caller can add per-shard data (cached embeddings) without holding every shard's keys."""
    from bicro_clean.pipeline.make_shards import sample_key

    count = spec.pictures or spec.pairs
    # Captions: "a photo of" 10 words drawn per picture, then the pair's number so every caption is distinct.
    words = np.random.default_rng(spec.seed).integers(0, 5000, (count, 10))
    stems = [f"a photo of {' '.join(f'w{x}' for x in row)}" for row in words]
    pool: dict[int, bytes] = {}  # a small pool is encoded once; a picture per pair is encoded when written
    noise = np.random.default_rng(spec.seed + 1)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(-(-spec.pairs // spec.shard_pairs)):
        first = index * spec.shard_pairs
        shard = SyntheticShard(index, directory / f"{index:05d}.tar", [], [], [])
        with tarfile.open(shard.path, "w", format=tarfile.GNU_FORMAT) as tar:
            for pair in range(first, min(first + spec.shard_pairs, spec.pairs)):
                picture = pair % count
                if picture not in pool:
                    jpeg = photo_jpeg(spec.seed, picture, spec.image_size, spec.quality)
                    if count < spec.pairs:
                        pool[picture] = jpeg
                else:
                    jpeg = pool[picture]
                noisy = count > 1 and noise.random() < spec.noise_rate
                described = (picture + int(noise.integers(1, count))) % count if noisy else picture
                key, caption = sample_key(index, pair - first, spec.shard_pairs), f"{stems[described]} number {pair}"
                _add(tar, f"{key}.jpg", _with_comment(jpeg, pair) if spec.distinct_bytes else jpeg)
                _add(tar, f"{key}.txt", caption.encode())
                if spec.truth:
                    _add(tar, f"{key}.json", json.dumps({"key": key, "truth_clean": not noisy}).encode())
                shard.keys.append(key)
                shard.captions.append(caption)
                shard.clean.append(not noisy)
        if on_shard is not None:
            on_shard(shard)
        paths.append(shard.path)
    return paths


def write_embeddings(output: str, shard: str, keys: list[str], captions: list[str], image: np.ndarray,
                     text: np.ndarray, size: tuple[int, int]) -> None:
    """An embeddings Parquet exactly as the embed stage writes it (pipeline.embed._embed_table + metadata), for a
    shard whose samples match the rows one to one (the write stage checks keys by position)."""
    from bicro_clean.pipeline.embed import _embed_table
    from bicro_clean.pipeline.layout import embedding_path
    from bicro_clean.pipeline.parquet_io import digest, package_version, write_parquet_atomic

    rows = [{"key": k, "status": "ok", "reason": None, "detail": None, "caption": c, "width": size[0],
             "height": size[1], "url": None, "uid": None, "image_sha256": None} for k, c in zip(keys, captions)]
    dims = (image.shape[1], text.shape[1])
    table = _embed_table(rows, image, text, shard, dims)
    encoder = {"spec": f"synthetic-{dims[0]}", "kind": "synthetic", "image_dim": dims[0], "text_dim": dims[1],
               "aligned": True}
    meta = {"stage": "embed", "cache_key": digest(shard, encoder), "encoder": encoder, "shard": shard,
            "package_version": package_version(), "samples": len(rows), "errors": 0}
    write_parquet_atomic(table, embedding_path(output, shard), meta)
