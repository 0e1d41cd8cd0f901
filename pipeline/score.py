"""Scoring stage: one shard's embeddings Parquet + the BiCro checkpoint -> `scores/<shard_id>.parquet`.

Every ok row is scored, whether or not its shard was in the training sample; error rows keep their reader
reason and get null scores. The Parquet is read in row batches, so memory is bounded by the batch plus one
shard's score columns, never by the dataset. The scores file is cached on (embedding cache key, checkpoint
hash): the keep-fraction cutoff pass and the decision/writing pass both read it instead of rescoring.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bicro_clean.models.devices import check_device
from bicro_clean.pipeline import progress, resume
from bicro_clean.pipeline.layout import embedding_path, scores_path
from bicro_clean.pipeline.parquet_io import (
    file_sha256,
    input_fingerprint,
    join,
    package_version,
    read_stage_metadata,
    write_parquet_atomic,
)
from bicro_clean.pipeline.shards import shard_id

logger = logging.getLogger(__name__)

CHECKPOINT_FILES = ("tensors.safetensors", "model.json")  # what BiCroModel.save writes; model.json last
BATCH_ROWS = 4096  # rows per Parquet batch for a model that does not say (BiCroModel.score_batch_rows does)
# margin_i2t / margin_t2i (models/margins.py) come from a checkpoint fitted with anchor margins on; null otherwise
FLOAT_SCORES = ("p_clean", "consistency", "r_i2t", "r_t2i", "soft_label", "match_score", "margin_i2t", "margin_t2i")
# float64: a calibrated probability near 0 or 1 needs the digits (float32 ties every pair with log-odds past ~17)
DOUBLE_SCORES = ("clean_score",)
ANCHOR_COLUMNS = {"anchor_key_i2t": "anchor_for_image", "anchor_key_t2i": "anchor_for_text"}
BASE_COLUMNS = ("shard", "key", "status", "reason", "detail", "caption", "width", "height", "url", "uid")


def pair_key(shard: str, key: str) -> str:
    """Run-wide name of a pair (anchor keys use it): keys alone may repeat across shards."""
    return f"{shard_id(shard)}/{key}"


def score_schema() -> pa.Schema:
    fields = [pa.field(c, pa.int32() if c in ("width", "height") else pa.string()) for c in BASE_COLUMNS]
    fields += [pa.field(c, pa.float32()) for c in FLOAT_SCORES]
    fields += [pa.field(c, pa.float64()) for c in DOUBLE_SCORES]
    fields += [pa.field(c, pa.string()) for c in ANCHOR_COLUMNS]
    return pa.schema(fields + [pa.field("encoder_cosine", pa.float32())])


def device(requested: str = "auto") -> str:
    """Where BiCro runs: an asked-for cuda / cuda:N (one line when this machine lacks it, never the CPU instead) or
    cpu as asked; otherwise (auto, mps) CUDA when present, else the CPU."""
    if requested.startswith("cuda"):
        check_device(requested)
        return requested
    return "cpu" if requested == "cpu" or not torch.cuda.is_available() else "cuda"


def checkpoint_sha256(path: str) -> str:
    """SHA-256 over the checkpoint folder's files (BiCroModel.save writes a folder, not one file).

    Memoised on the files' size/mtime stamps: every shard task asks, and the checkpoint can be megabytes.
    """
    return _checkpoint_sha256(path, tuple(input_fingerprint(join(path, name)) for name in CHECKPOINT_FILES))


@functools.lru_cache(maxsize=16)
def _checkpoint_sha256(path: str, stamps: tuple[str, ...]) -> str:
    files = {name: file_sha256(join(path, name)) for name in CHECKPOINT_FILES}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def local_checkpoint(path: str) -> Iterator[str]:
    """The checkpoint folder on local disk: itself, or a temporary copy of a remote (fsspec) one."""
    if "://" not in path:
        yield path
        return
    with tempfile.TemporaryDirectory() as scratch:
        for name in CHECKPOINT_FILES:
            with fsspec.open(join(path, name), "rb") as src, open(os.path.join(scratch, name), "wb") as dst:
                shutil.copyfileobj(src, dst)
        yield scratch


def load_model(checkpoint_path: str, requested: str = "auto") -> Any:
    """The fitted BiCro model on the `requested` device (`device`: auto is CUDA when present, else CPU)."""
    from bicro_clean.models.bicro import BiCroModel

    with local_checkpoint(checkpoint_path) as local:
        return BiCroModel.load(local, device=device(requested))


def fixed_list_matrix(column: pa.Array) -> np.ndarray:
    """(rows, dim) float32 matrix of a FixedSizeList column, whatever its stored float type (embed.dtype float16 or
    float32; a float32 column comes back as a zero-copy view); null rows hold whatever the slots hold."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    flat = column.values.to_numpy(zero_copy_only=False)
    rows = flat[column.offset * dim:(column.offset + len(column)) * dim].reshape(len(column), dim)
    return rows.astype(np.float32, copy=False)


def _anchor_names(model: Any, index: np.ndarray) -> list[str | None]:
    names = model.anchor_keys
    return [names[i] if 0 <= i < len(names) else None for i in np.asarray(index, dtype=np.int64)]


def score_batch(model: Any, batch: pa.RecordBatch, aligned: bool) -> dict[str, Any]:
    """Score columns for one batch of embedding rows: full length, NaN / None on error rows."""
    ok = np.asarray(batch.column("status").to_pylist(), dtype=object) == "ok"
    out: dict[str, Any] = {c: np.full(batch.num_rows, np.nan, dtype=np.float32) for c in FLOAT_SCORES}
    out.update({c: np.full(batch.num_rows, np.nan) for c in DOUBLE_SCORES})
    out.update({c: [None] * batch.num_rows for c in ANCHOR_COLUMNS})
    out["encoder_cosine"] = np.full(batch.num_rows, np.nan, dtype=np.float32)
    if not ok.any():
        return out
    image = fixed_list_matrix(batch.column("image_emb"))[ok]
    text = fixed_list_matrix(batch.column("text_emb"))[ok]
    keys = [pair_key(s, k) for s, k in zip(np.asarray(batch.column("shard").to_pylist())[ok],
                                            np.asarray(batch.column("key").to_pylist())[ok])]
    _fill(out, ok, model.score(image, text, keys=keys), model)
    if aligned and image.shape[1] == text.shape[1]:
        # raw cosine of the stored (L2-normalised) embeddings: what a CLIP-score rule would threshold
        out["encoder_cosine"][ok] = np.einsum("ij,ij->i", image, text)
    return out


def _fill(out: dict[str, Any], ok: np.ndarray, scored: dict[str, np.ndarray], model: Any) -> None:
    for column in FLOAT_SCORES:
        if column in scored:  # the anchor margins only where the checkpoint has them on: null otherwise
            out[column][ok] = np.asarray(scored[column], dtype=np.float32)
    for column in DOUBLE_SCORES:
        out[column][ok] = np.asarray(scored[column], dtype=np.float64)
    rows = np.flatnonzero(ok)
    for column, index_name in ANCHOR_COLUMNS.items():
        for row, name in zip(rows, _anchor_names(model, scored[index_name])):
            out[column][row] = name


def _batch_table(batch: pa.RecordBatch, scores: dict[str, Any]) -> pa.Table:
    schema = score_schema()
    arrays = [batch.column(c) for c in BASE_COLUMNS]
    arrays += [pa.array(scores[c], type=pa.float32(), from_pandas=True) for c in FLOAT_SCORES]
    arrays += [pa.array(scores[c], type=pa.float64(), from_pandas=True) for c in DOUBLE_SCORES]
    arrays += [pa.array(scores[c], type=pa.string()) for c in ANCHOR_COLUMNS]
    arrays.append(pa.array(scores["encoder_cosine"], type=pa.float32(), from_pandas=True))
    return pa.Table.from_arrays([a.cast(f.type) for a, f in zip(arrays, schema)], schema=schema)


def batch_rows_for(model: Any) -> int:
    """Rows per Parquet batch: the model's own size (4,096 on the CPU, 65,536 on CUDA), else BATCH_ROWS.

    Scores never depend on the batch (BiCroModel.score works on fixed-shape chunks), only time and memory do."""
    rows = getattr(model, "score_batch_rows", None)
    return int(rows) if isinstance(rows, int) and rows > 0 else BATCH_ROWS


def score_embeddings(model: Any, embedding_path: str, aligned: bool, batch_rows: int | None = None) -> pa.Table:
    """Score every row of one embeddings Parquet, reading `batch_rows` rows at a time (default: the model's)."""
    batch_rows = batch_rows or batch_rows_for(model)
    columns = list(BASE_COLUMNS) + ["image_emb", "text_emb"]
    parts = []
    with fsspec.open(embedding_path, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns):
            parts.append(_batch_table(batch, score_batch(model, batch, aligned)))
    return pa.concat_tables(parts) if parts else score_schema().empty_table()


def encoder_info(embedding_path: str) -> dict[str, Any]:
    meta = read_stage_metadata(embedding_path)
    if meta is None:
        raise FileNotFoundError(f"no embeddings at {embedding_path}: run the embed stage first")
    return meta


# Bumped when the same checkpoint and embeddings score differently (2: the "pca" anchor search on the CPU; 3: its
# IVF candidates from 4,096 anchor rows), so a rerun recomputes scores files made by the
# older scoring instead of reusing them.
SCORING_VERSION = 5  # 4: clean_score; 5: the anchor margin columns


def score_key(embedding_meta: dict[str, Any], checkpoint_sha: str) -> str:
    return resume.stage_key(embedding_meta.get(resume.KEY), checkpoint_sha, package_version(), SCORING_VERSION)


def shared_model(checkpoint_path: str, requested: str = "auto") -> Any:
    """One loaded model per process, checkpoint and device, whichever runner maps the shards over it."""
    return _shared_model(checkpoint_path, device(requested))  # keyed on where it runs: auto and cuda are one model


@functools.lru_cache(maxsize=2)
def _shared_model(checkpoint_path: str, where: str) -> Any:
    return load_model(checkpoint_path, where)


@dataclass
class _Job:
    """One shard whose scores file is not current: where its embeddings are, where its scores go, its key."""

    shard: str
    source: str
    target: str
    meta: dict[str, Any]
    key: str
    checkpoint_sha: str

    @property
    def aligned(self) -> bool:
        return bool(self.meta["encoder"].get("aligned"))


def _job(shard: str, output: str, checkpoint_sha: str) -> _Job | None:
    """The shard's scoring job, or None when its scores file already records the key (cached)."""
    source, target = embedding_path(output, shard), scores_path(output, shard)
    meta = encoder_info(source)
    key = score_key(meta, checkpoint_sha)
    if resume.parquet_is_current(target, key):
        logger.debug("score: %s cached", shard)
        return None
    return _Job(shard, source, target, meta, key, checkpoint_sha)


def _write_scores(job: _Job, table: pa.Table) -> None:
    write_parquet_atomic(table, job.target, {"stage": "score", resume.KEY: job.key, "shard": job.shard,
                                             "encoder": job.meta["encoder"], "checkpoint_sha256": job.checkpoint_sha,
                                             "embedding_cache_key": job.meta.get(resume.KEY),
                                             "package_version": package_version()})


def _scored_pack(model: Any, pack: list[tuple[int, pa.RecordBatch]], aligned: bool) -> list[tuple[int, pa.Table]]:
    """Score the rows of `pack` (batches of one or more shards) in one call; each batch's slice of the result."""
    merged = pa.concat_tables([pa.Table.from_batches([batch]) for _, batch in pack]).combine_chunks()
    batch = merged.to_batches()[0] if merged.num_rows else pack[0][1]
    table = _batch_table(batch, score_batch(model, batch, aligned))
    parts, offset = [], 0
    for job, part in pack:
        parts.append((job, table.slice(offset, part.num_rows)))
        offset += part.num_rows
    return parts


def _score_jobs(model: Any, jobs: list[_Job], batch_rows: int) -> Iterator[tuple[_Job, pa.Table]]:
    """Every job's score table, in order, scoring the rows of consecutive shards together in packs of about
    `batch_rows` rows. A pair's scores do not depend on the other rows of its call (BiCroModel.score works on
    fixed-shape chunks), so packing changes no byte; it saves each small shard a whole padded chunk (1,024 rows on
    the CPU: the heads, the negative-bank hinge and the anchor search cost ~0.6 s of a 2-core machine, whether
    the shard has 10 rows or 1,000). Memory: one pack plus the score columns of the shards it spans."""
    parts: dict[int, list[pa.Table]] = {}
    pack: list[tuple[int, pa.RecordBatch]] = []
    read: list[int] = []  # jobs read to the end, emitted once their last rows are scored
    columns = list(BASE_COLUMNS) + ["image_emb", "text_emb"]

    def flush() -> Iterator[tuple[_Job, pa.Table]]:
        if pack:
            for index, table in _scored_pack(model, pack, jobs[pack[0][0]].aligned):
                parts.setdefault(index, []).append(table)
            pack.clear()
        for index in read:
            tables = parts.pop(index, [])
            yield jobs[index], (pa.concat_tables(tables).combine_chunks() if tables
                                else score_schema().empty_table())
        read.clear()

    for index, job in enumerate(jobs):
        if pack and jobs[pack[0][0]].aligned != job.aligned:  # a pack is scored with one `aligned`
            yield from flush()
        with fsspec.open(job.source, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns):
                pack.append((index, batch))
                if sum(b.num_rows for _, b in pack) >= batch_rows:
                    yield from flush()
        read.append(index)
    yield from flush()


def score_shards(shards: list[str], output: str, checkpoint_path: str, model: Any | None = None,
                 requested: str = "auto") -> list[bool]:
    """Write (or reuse) `scores/<shard_id>.parquet` for each shard; per shard, True when its file was current
    already (cached). The model is loaded (once per process) only when some shard needs scoring."""
    checkpoint_sha = checkpoint_sha256(checkpoint_path)
    jobs = [_job(shard, output, checkpoint_sha) for shard in shards]
    for job in jobs:
        if job is None:
            progress.report("score", advance=1)
    todo = [job for job in jobs if job is not None]
    if todo:
        model = model if model is not None else shared_model(checkpoint_path, requested)
        for job, table in _score_jobs(model, todo, batch_rows_for(model)):
            _write_scores(job, table)
            progress.report("score", advance=1)
    return [job is None for job in jobs]


def score_shard(shard: str, output: str, checkpoint_path: str, model: Any | None = None) -> str:
    """Write (or reuse) `scores/<shard_id>.parquet` for one shard; returns its path."""
    score_shards([shard], output, checkpoint_path, model)
    return scores_path(output, shard)
