"""Flickr8k for the lab: load it, embed it once (cached), and cut real-JPEG shards from it for benchmarks.

Noise is applied at caption level by permuting image assignments or substituting another Flickr8k caption, so
embeddings of images and captions do not depend on the noise rate or seed: one cache per encoder serves every
evaluation run. Generated alt-text strings are embedded once per set of strings (`cached_text_embeddings`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bicro_clean.models.encoders import Encoder, load_encoder, shared_encoder

logger = logging.getLogger(__name__)


@dataclass
class Flickr8k:
    image_names: list[str]  # index -> file name
    captions: list[str]  # one row per caption
    caption_image: np.ndarray  # caption index -> image index (the true pairing)
    caption_index: np.ndarray  # 0..4: which of the image's captions this is
    split_of_image: dict[str, str]  # image name -> train/test


def load_flickr8k(data_dir: str | Path) -> Flickr8k:
    data_dir = Path(data_dir)
    with open(data_dir / "captions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    splits = json.loads((data_dir / "splits.json").read_text())
    split_of_image = {name: split for split, names in splits.items() for name in names}
    image_names = sorted({row["image"] for row in rows})
    image_index = {name: i for i, name in enumerate(image_names)}
    seen: dict[str, int] = {}
    caption_index = []
    for row in rows:
        caption_index.append(seen.get(row["image"], 0))
        seen[row["image"]] = caption_index[-1] + 1
    return Flickr8k(
        image_names=image_names,
        captions=[row["caption"].strip() for row in rows],
        caption_image=np.array([image_index[row["image"]] for row in rows], dtype=np.int64),
        caption_index=np.array(caption_index, dtype=np.int64),
        split_of_image=split_of_image,
    )


class _ImageFolder(Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))  # as the shard reader hands images to the encoder


def _embed_images(encoder: Encoder, paths: list[Path], batch_size: int, workers: int) -> np.ndarray:
    loader = DataLoader(_ImageFolder(paths, encoder.image_transform()), batch_size=batch_size, num_workers=workers)
    chunks = []
    for i, batch in enumerate(loader):
        chunks.append(encoder.encode_images(batch).numpy())
        if i % 10 == 0:
            logger.info("images %d/%d", min((i + 1) * batch_size, len(paths)), len(paths))
    return np.concatenate(chunks).astype(np.float32)


def _embed_texts(encoder: Encoder, texts: list[str], batch_size: int) -> np.ndarray:
    chunks = [encoder.encode_texts(texts[i : i + batch_size]).numpy() for i in range(0, len(texts), batch_size)]
    return np.concatenate(chunks).astype(np.float32)


CACHE_FORMAT = 3  # bump when the way benchmark embeddings are computed changes


def cached_embeddings(
    data_dir: str | Path,
    cache_dir: str | Path,
    encoder_spec: str = "towers",
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
) -> dict[str, np.ndarray]:
    """Image and caption embeddings of the whole benchmark, computed once per encoder and data folder."""
    data_dir = Path(data_dir)
    # The key holds the encoder's own description (weights digest included) and the cache format: a cache made
    # by other weights or another preprocessing must never be reused. (A cache keyed on the spec alone once
    # served image embeddings that matched no fresh encoding of any photo: cosine ~0.3 with the right one.)
    encoder = load_encoder(encoder_spec, device)
    identity = json.dumps({"data": str(data_dir.resolve()), "encoder": encoder.describe(), "format": CACHE_FORMAT},
                          sort_keys=True)
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"flickr8k-{encoder_spec.replace(':', '_').replace('/', '_')}-{key}.npz"
    if path.exists():
        logger.info("using cached benchmark embeddings %s", path)
        return dict(np.load(path))
    data = load_flickr8k(data_dir)
    image_emb = _embed_images(encoder, [data_dir / "images" / n for n in data.image_names], batch_size, workers)
    text_emb = _embed_texts(encoder, data.captions, 256)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, image_emb=image_emb, text_emb=text_emb)
    tmp.rename(path)
    return {"image_emb": image_emb, "text_emb": text_emb}


def _encoder_identity(encoder: Encoder) -> str:
    return json.dumps({"encoder": encoder.describe(), "format": CACHE_FORMAT}, sort_keys=True)


def cached_text_embeddings(
    texts: list[str], cache_dir: str | Path, encoder_spec: str = "towers", device: str = "auto"
) -> np.ndarray:
    """Embeddings of arbitrary strings (the alt-text noise) with the benchmark's text encoder, cached under a key
    of the encoder's description and the strings themselves, so a rerun with the same seed is instant."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    encoder = shared_encoder(encoder_spec, device)
    digest = hashlib.sha256(_encoder_identity(encoder).encode())
    digest.update(json.dumps(texts, ensure_ascii=False).encode())
    path = Path(cache_dir) / f"texts-{encoder_spec.replace(':', '_').replace('/', '_')}-{digest.hexdigest()[:16]}.npy"
    if path.exists():
        logger.info("using cached text embeddings %s", path)
        return np.load(path)
    embeddings = _embed_texts(encoder, texts, 256)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, embeddings)
    tmp.rename(path)
    return embeddings


def flickr_shards(root: Path, data_dir: Path, pairs: int, shards: int) -> Path:
    """`shards` img2dataset-style tars (through make-shards) of the first `pairs` Flickr8k images, each with its
    first caption: real JPEG decode cost. Returns the folder holding them (root/shards)."""
    from bicro_clean.pipeline.make_shards import make_shards

    with open(data_dir / "captions.csv", newline="", encoding="utf-8") as fh:
        rows: dict[str, str] = {}
        for row in csv.DictReader(fh):
            rows.setdefault(row["image"], row["caption"])
    chosen = sorted(rows)[:pairs]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows([name, rows[name]] for name in chosen)
    make_shards(data_dir / "images", root / "captions.csv", root / "shards", shard_size=max(1, -(-pairs // shards)))
    return root / "shards"
