"""Embedding stage: shards in, one Parquet of embeddings per shard out.

Every input row lands in the shard's Parquet, failures included (status ``error`` with a reason code), so
``samples in = embedded + recorded errors`` holds per shard. Decoding (large JPEGs at a reduced DCT scale, never
below what the encoder's transform needs) and caption tokenisation run in DataLoader worker processes, one shard
per worker at a time, so a shard's rows keep their order; the model stays in the main process. With a CUDA encoder
(`embed.jpeg_decode`), JPEGs instead ship as bytes and decode in batches on the device (`pipeline.device_decode`),
anything that path refuses falling back to the CPU decode with the same reason codes. Embeddings are
stored as float16 by default (`embed.dtype`); readers get float32 (`pipeline.score.fixed_list_matrix`).
A shard whose Parquet already exists with the same cache key (input fingerprint + encoder + config) is skipped.
The shard's bytes are hashed as they stream and each sample's members are digested (pipeline/content_id.py): the
Parquet records both, and its cache key, which later stages build theirs on, includes the shard's digest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bicro_clean.models.encoders import LOAD_LOCK, Encoder, load_encoder, set_offline_env
from bicro_clean.models.tokens import TextTokens
from bicro_clean.pipeline.config import CleanConfig, ReaderConfig
from bicro_clean.pipeline.daemon_children import children_allowed
from bicro_clean.pipeline.content_id import StreamTally, sample_digest
from bicro_clean.pipeline.decode import decode_sample
from bicro_clean.pipeline.device_decode import (
    DeviceDecoder,
    JpegBatch,
    batchable_jpeg,
    device_decoder,
    jpeg_path,
    resolve_chunk,
)
from bicro_clean.pipeline import progress, resume
from bicro_clean.pipeline.embed_table import EMBED_ROW_GROUP_ROWS, embed_table as _embed_table
from bicro_clean.pipeline.layout import embedding_path
from bicro_clean.pipeline.parquet_io import (
    cpu_threads,
    read_columns,
    shard_fingerprint,
    package_version,
    read_stage_metadata,
    write_parquet_atomic,
)
from bicro_clean.pipeline.shards import IMAGE_EXTENSIONS, DecodedSample, RawSample, ReadIssue, expand_shard_spec
from bicro_clean.pipeline.tar_reader import iter_shard

logger = logging.getLogger(__name__)


@dataclass
class Chunk:
    """Up to batch_size rows of one shard, decoded in a worker. `last` marks the end of the shard."""

    shard: str
    rows: list[dict[str, Any]]
    pixels: torch.Tensor | None  # stacked images of the ok rows whose image bytes are new in this shard, in order
    last: bool = False
    tokens: Any = None  # the ok rows' captions tokenised in the worker (encoder.text_transform), None: none
    jpegs: JpegBatch | None = None  # device path: JPEG bytes for the main process's batched decoder; pixels: the rest
    source: dict[str, Any] | None = None  # last chunk: the shard's stream digest (content_id.StreamTally.summary)

    def pin_memory(self) -> Chunk:
        """Called by the DataLoader's pin thread when pin_memory is on (CUDA): page-locked pixels, tokens and JPEG
        bytes, so the encoder's non_blocking copies overlap the next chunk's decode."""
        return replace(self, pixels=_pinned(self.pixels), tokens=_pinned(self.tokens),
                       jpegs=self.jpegs.pinned() if self.jpegs else self.jpegs)


def _pinned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {k: _pinned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pinned(v) for v in value]
    if isinstance(value, TextTokens):
        return replace(value, batches=_pinned(value.batches))
    return value


@dataclass
class ShardResult:
    shard: str
    path: str
    samples: int
    embedded: int
    errors: int
    cached: bool
    reasons: dict[str, int] = field(default_factory=dict)


def _row(item: DecodedSample | ReadIssue) -> dict[str, Any]:
    if isinstance(item, ReadIssue):
        return {"key": item.key, "status": "error", "reason": item.reason, "detail": item.detail[:500],
                "caption": None, "width": None, "height": None, "url": _as_text(item.url), "uid": _as_text(item.uid),
                "image_sha256": None}
    meta = item.meta if isinstance(item.meta, dict) else {}
    return {"key": item.key, "status": "ok", "reason": None, "detail": None, "caption": item.caption,
            "width": item.width, "height": item.height,
            "url": _as_text(meta.get("url")), "uid": _as_text(meta.get("uid")), "image_sha256": _image_digest(item)}


def _image_digest(item: DecodedSample) -> str:
    extension = next(ext for ext in IMAGE_EXTENSIONS if ext in item.raw.members)
    return hashlib.sha256(item.raw.members[extension]).hexdigest()


def _as_text(value: Any) -> str | None:
    # JSON can spell lone surrogates ("\ud800"), which Arrow cannot store: keep them as visible escapes
    return None if value is None else str(value).encode("utf-8", "backslashreplace").decode("utf-8")


class ShardStream(IterableDataset):
    """Yields Chunks; each worker reads its own subset of the shards (round robin)."""

    def __init__(self, shards: list[str], reader: ReaderConfig, transform, batch_size: int,
                 min_side: int | None = None, tokenize=None, batch_jpegs: bool = False) -> None:
        self.shards, self.reader, self.transform, self.batch_size = shards, reader, transform, batch_size
        self.min_side = min_side  # JPEGs decode at the smallest DCT scale whose shorter side stays >= this
        self.tokenize = tokenize  # captions -> tokens, here in the worker; None: the main process tokenises
        self.defer = batchable_jpeg if batch_jpegs else None  # device path: such JPEGs ship as bytes, undecoded

    def _chunk(self, shard: str, rows: list[dict[str, Any]], pixels: list[torch.Tensor], last: bool,
               jpegs: JpegBatch, source: dict[str, Any] | None = None) -> Chunk:
        captions = [r["caption"] for r in rows if r["status"] == "ok"]
        tokens = self.tokenize(captions) if self.tokenize is not None and captions else None
        return Chunk(shard, rows, torch.stack(pixels) if pixels else None, last, tokens,
                     jpegs.packed() if jpegs else None, source)

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in mine:
            yield from self._chunks(shard)

    def _chunks(self, shard: str) -> Iterator[Chunk]:
        rows: list[dict[str, Any]] = []
        pixels: list[torch.Tensor] = []
        jpegs = JpegBatch()
        seen: set[str] = set()  # image bytes already sent for this shard: the model runs once per distinct image
        tally = StreamTally()  # the shard's bytes, hashed as they stream in
        for raw in iter_shard(shard, self.reader, tally):
            item = decode_sample(raw, self.reader, self.min_side, self.defer) if isinstance(raw, RawSample) else raw
            row = _row(item)
            row["sample_sha256"] = sample_digest(raw) if isinstance(raw, RawSample) else None  # decode errors too
            if isinstance(item, DecodedSample) and item.image is None:  # left for the batched decoder
                jpegs.add(len(rows), item, first=row["image_sha256"] not in seen)
                seen.add(row["image_sha256"])
            elif isinstance(item, DecodedSample) and row["image_sha256"] not in seen:
                try:
                    pixels.append(self.transform(item.image))
                    seen.add(row["image_sha256"])
                except Exception as error:  # a transform failure is that sample's problem, not the run's
                    row.update(status="error", reason="decode_error", detail=f"transform: {error}"[:500],
                               image_sha256=None)
            rows.append(row)
            if len(rows) >= self.batch_size:
                yield self._chunk(shard, rows, pixels, False, jpegs)
                rows, pixels, jpegs = [], [], JpegBatch()
        yield self._chunk(shard, rows, pixels, True, jpegs, tally.summary())


def _worker_init(_: int) -> None:
    # Each decode worker gets one thread: the main process owns the cores for the model.
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # HF tokenizers: one thread per worker too


def decode_side(encoder: Encoder) -> int | None:
    """Shorter side the encoder's transform needs (JPEGs decode reduced down to it); None: full-size decodes."""
    side = getattr(encoder, "decode_side", None)
    return int(side()) if callable(side) else None


def embed_key(shard: str, encoder: Encoder, config: CleanConfig) -> str:
    # the decode scale changes the pixels of large JPEGs, so it is part of what made the embeddings; so does the
    # JPEG decode path, recorded only when it is the batched one (the CPU path's keys stay what they always were)
    decode = {"jpeg_reduced_decode_side": decode_side(encoder)}
    if jpeg_path(config.embed.jpeg_decode, encoder) == "device":
        decode["jpeg_decode"] = "device"
    return resume.stage_key(shard_fingerprint(shard), encoder.describe(), config.reader.digest(),
                            config.embed.model_dump(exclude=resume.RUNTIME_ONLY | {"jpeg_decode"}), decode)


class _ShardAccumulator:
    """Collects one shard's rows and embeddings until its last chunk arrives."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.image: list[np.ndarray] = []
        self.text: list[np.ndarray] = []
        self.by_digest: dict[str, np.ndarray] = {}  # image embedding per distinct image of this shard
        self.failed: dict[str, bytes] = {}  # device path: bytes of images the CPU path failed on too

    def add(self, rows: list[dict[str, Any]], image: np.ndarray, text: np.ndarray) -> None:
        self.rows.extend(rows)
        self.image.append(image)
        self.text.append(text)


@dataclass
class EmbedTimings:
    wait_s: float = 0.0  # main process waiting for decoded chunks (decode is the bottleneck when large)
    image_model_s: float = 0.0
    text_model_s: float = 0.0
    write_s: float = 0.0
    samples: int = 0


def _encode_chunk(encoder: Encoder, chunk: Chunk, acc: _ShardAccumulator, timings: EmbedTimings,
                  decoder: DeviceDecoder | None = None) -> tuple[np.ndarray, np.ndarray]:
    t0 = time.perf_counter()
    pixels, tokens = chunk.pixels, chunk.tokens
    if chunk.jpegs is not None:  # device path (time counted as image model time): may turn rows into errors
        if decoder is None:
            raise RuntimeError(f"{chunk.shard}: a chunk with JPEG bytes but no device decoder")
        ok_before = sum(r["status"] == "ok" for r in chunk.rows)
        digests = [r.get("sample_sha256") for r in chunk.rows]  # a refused image's row is rebuilt from its issue
        pixels = resolve_chunk(chunk.rows, chunk.shard, chunk.jpegs, pixels, acc.by_digest, acc.failed, decoder,
                               _row)
        for row, sample_sha256 in zip(chunk.rows, digests):
            row["sample_sha256"] = sample_sha256
        if sum(r["status"] == "ok" for r in chunk.rows) != ok_before:
            tokens = None  # the worker tokenised captions of rows now failed: tokenise the rest here (rare)
    ok_rows = [r for r in chunk.rows if r["status"] == "ok"]
    captions = [r["caption"] for r in ok_rows]
    if pixels is not None:
        new = encoder.encode_images(pixels).numpy()
        fresh = list(dict.fromkeys(r["image_sha256"] for r in ok_rows if r["image_sha256"] not in acc.by_digest))
        if len(fresh) != len(new):  # worker and main process disagree on which images are new: never guess
            raise RuntimeError(f"{chunk.shard}: {len(new)} images encoded for {len(fresh)} new digests")
        acc.by_digest.update(zip(fresh, new))
    image = np.stack([acc.by_digest[r["image_sha256"]] for r in ok_rows]) if ok_rows else np.zeros((0, encoder.image_dim), np.float32)
    t1 = time.perf_counter()
    if tokens is not None:  # tokenised in the worker: the same tokens encode_texts would make here
        text = encoder.encode_tokens(tokens).numpy()
        if len(text) != len(captions):
            raise RuntimeError(f"{chunk.shard}: {len(text)} caption embeddings for {len(captions)} captions")
    else:
        text = encoder.encode_texts(captions).numpy() if captions else np.zeros((0, encoder.text_dim), np.float32)
    timings.image_model_s += t1 - t0
    timings.text_model_s += time.perf_counter() - t1
    return image, text


def _write_shard(acc: _ShardAccumulator, shard: str, path: str, key: str, encoder: Encoder,
                 config: CleanConfig, source: dict[str, Any] | None) -> ShardResult:
    """`key`: the embed key from the shard's up-front identity (what a rerun compares, `identity_key`); the file's
    cache key adds the digest of the bytes read, so every stage keyed on it follows a change of content."""
    dims = (encoder.image_dim, encoder.text_dim)
    image = np.concatenate(acc.image) if acc.image else np.zeros((0, dims[0]), np.float32)
    text = np.concatenate(acc.text) if acc.text else np.zeros((0, dims[1]), np.float32)
    table = _embed_table(acc.rows, image, text, shard, dims, config.embed.dtype)
    reasons = _reason_counts(acc.rows)
    source = source or {}
    meta = {"stage": "embed", resume.KEY: resume.stage_key(key, source.get("sha256")), "identity_key": key,
            "input": source, "encoder": encoder.describe(), "shard": shard,
            "config_hash": config.embed.digest(), "reader_hash": config.reader.digest(),
            "package_version": package_version(), "samples": len(acc.rows), "errors": sum(reasons.values())}
    write_parquet_atomic(table, path, meta, EMBED_ROW_GROUP_ROWS)
    return ShardResult(shard, path, len(acc.rows), len(acc.rows) - sum(reasons.values()),
                       sum(reasons.values()), cached=False, reasons=reasons)


def _reason_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return counts


def _was_unreadable(path: str, meta: dict[str, Any]) -> bool:
    """The cached file is one shard_unreadable row (a 404, a gone mount): read the shard again, it may be back."""
    if int(meta.get("samples", 0)) != 1 or int(meta.get("errors", 0)) != 1:
        return False
    return read_columns(path, ["reason"])["reason"].to_pylist() == ["shard_unreadable"]


def _cached_result(shard: str, path: str, key: str) -> ShardResult | None:
    """The shard's result from its embedding file when that file is current (one metadata read), else None."""
    meta = read_stage_metadata(path) or {}
    if meta.get("identity_key") != key or _was_unreadable(path, meta):
        return None
    samples, errors = int(meta.get("samples", 0)), int(meta.get("errors", 0))
    return ShardResult(shard, path, samples, samples - errors, errors, cached=True)


def _loader(shards: list[str], encoder: Encoder, config: CleanConfig, batch_jpegs: bool = False) -> DataLoader:
    workers = min(config.embed.num_workers, len(shards))
    tokenize = encoder.text_transform() if hasattr(encoder, "text_transform") else None
    stream = ShardStream(shards, config.reader, encoder.image_transform(), config.embed.batch_size,
                         decode_side(encoder), tokenize, batch_jpegs)
    # Own generator: DataLoader otherwise draws its worker base seed from torch's global RNG, which would
    # disturb a seeded model init running in another thread of the same process (and vice versa).
    return DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=_worker_init,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0), pin_memory=pins_memory(encoder))


def pins_memory(encoder: Encoder) -> bool:
    """Page-locked chunks only for a CUDA encoder (pinning needs CUDA; on CPU it would be a wasted copy)."""
    device = getattr(encoder, "device", None)
    return isinstance(device, torch.device) and device.type == "cuda" and torch.cuda.is_available()


def _prepare_process(config: CleanConfig) -> None:
    if not config.embed.encoder.startswith("open_clip"):
        set_offline_env()  # only an explicitly requested open_clip hub model may reach the network
    # The same thread count on every runner: a Dask worker starts with 1 and sums would differ in the last bit.
    torch.set_num_threads(config.embed.threads or cpu_threads())


def embed_shards(config: CleanConfig, encoder: Encoder | None = None,
                 timings: EmbedTimings | None = None, shards: list[str] | None = None) -> list[ShardResult]:
    """Embed `shards` (default: every shard of `config.input`) into `config.output/embeddings/`, streaming them
    through one loader whose decode workers share the shards; cached shards are skipped."""
    _prepare_process(config)
    encoder = encoder or load_encoder(config.embed.encoder, config.embed.device, config.embed.autocast)
    timings = timings or EmbedTimings()
    results, todo = [], []
    if shards is None:
        shards = list(expand_shard_spec(config.input, allow_pipe=config.reader.allow_pipe))
    for shard in shards:
        path, key = embedding_path(config.output, shard), embed_key(shard, encoder, config)
        cached = _cached_result(shard, path, key)
        if cached is not None:
            results.append(cached)
        else:
            todo.append((shard, path, key))
    logger.info("embed: %d shards cached, %d to do", len(results), len(todo))
    progress.plan_pairs("embed", shards)  # the bar's total in pairs, unless the run planned it (pair_count.py)
    for cached in results:  # their pairs are no work of this run: out of the total
        progress.finish("embed", cached.shard, cached.samples, cached=True)
    if todo:
        results += _embed_todo(todo, encoder, config, timings)
    return sorted(results, key=lambda r: r.path)


def _embed_todo(todo: list[tuple[str, str, str]], encoder: Encoder, config: CleanConfig,
                timings: EmbedTimings) -> list[ShardResult]:
    targets = {shard: (path, key) for shard, path, key in todo}
    pending: dict[str, _ShardAccumulator] = {}
    results = []
    decoder = None
    if jpeg_path(config.embed.jpeg_decode, encoder) == "device":
        decoder = device_decoder(encoder, config.reader, decode_side(encoder))
    clock = time.perf_counter()
    # forks the decode workers: never while another thread builds a model; also from a daemonic Dask worker
    with LOAD_LOCK, children_allowed():  # (pipeline/daemon_children.py says why that is safe)
        chunks = iter(_loader([t[0] for t in todo], encoder, config, batch_jpegs=decoder is not None))
    for chunk in chunks:
        timings.wait_s += time.perf_counter() - clock
        acc = pending.setdefault(chunk.shard, _ShardAccumulator())
        image, text = _encode_chunk(encoder, chunk, acc, timings, decoder)  # may rewrite chunk.rows' failures
        acc.add(chunk.rows, image, text)
        timings.samples += len(chunk.rows)
        progress.report("embed", advance=len(chunk.rows))  # pairs
        if chunk.last:
            t0 = time.perf_counter()
            results.append(_write_shard(pending.pop(chunk.shard), chunk.shard, *targets[chunk.shard],
                                        encoder, config, chunk.source))
            timings.write_s += time.perf_counter() - t0
            progress.finish("embed", chunk.shard, results[-1].samples)  # the total corrected to its real rows
        clock = time.perf_counter()
    return results

