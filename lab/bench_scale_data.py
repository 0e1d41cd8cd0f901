"""Synthetic embeddings, score files and write outputs in the pipeline's own format, for `bench --scale`.

Every file is built with the pipeline's schemas and writers (pipeline.embed_table, pipeline.score.score_schema,
pipeline.writers / pipeline.write) and carries the metadata its stage records, so the run-wide stages (fit,
select, finalize, report) read them exactly as they read a real run's. Values are random: only cost is measured.

Keys are img2dataset-style (shard number then row number, 10 digits); the first DUPLICATES keys of every shard
are the same in all shards, so the repeated-keys pass has work to do. 1% of rows are decode errors.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from bicro_clean.pipeline import resume, select
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.embed_table import EMBED_ROW_GROUP_ROWS, base_schema, fixed_list
from bicro_clean.pipeline.layout import annotated_path, embedding_path, filtered_path, result_path, scores_path
from bicro_clean.pipeline.parquet_io import digest, package_version, write_parquet_atomic
from bicro_clean.pipeline.score import ANCHOR_COLUMNS, DOUBLE_SCORES, FLOAT_SCORES, score_schema
from bicro_clean.pipeline.shards import shard_id
from bicro_clean.pipeline.write import (
    _counts,
    _metadata,
    annotated_table,
    output_entry,
    output_keys,
    reading_report,
    write_key,
)
from bicro_clean.pipeline.writers import kept_rows, write_annotated, write_json_atomic

logger = logging.getLogger(__name__)

DUPLICATES = 5  # keys repeated in every shard
ERROR_RATE = 0.01
CHECKPOINT_SHA = "synthetic"


def shard_rows(rows: int, shards: int) -> list[int]:
    """`rows` spread over `shards` as evenly as possible."""
    return [rows // shards + (i < rows % shards) for i in range(shards)]


def encoder(dim: int) -> dict[str, Any]:
    return {"spec": f"synthetic:{dim}", "kind": "synthetic", "image_dim": dim, "text_dim": dim, "aligned": False}


def _base(shard: str, number: int, n: int, rng: np.random.Generator) -> tuple[dict[str, Any], np.ndarray]:
    ok = rng.random(n) >= ERROR_RATE
    keys = [f"dup{r:07d}" if r < DUPLICATES else f"{number:05d}{r:05d}" for r in range(n)]
    columns: dict[str, Any] = {
        "shard": [shard] * n, "key": keys, "status": np.where(ok, "ok", "decode_error").tolist(),
        "reason": [None if good else "decode_error" for good in ok], "detail": [None] * n,
        "caption": [f"a synthetic caption {r}" for r in range(n)], "width": [64] * n, "height": [64] * n,
        "url": [None] * n, "uid": [f"{number:016x}{r:016x}" for r in range(n)],
    }
    return columns, ok


def write_embeddings(config: CleanConfig, shard: str, number: int, n: int, dim: int, seed: int) -> str:
    rng = np.random.default_rng((seed, number, 0))
    columns, ok = _base(shard, number, n, rng)
    columns.update(image_sha256=[None] * n, sample_sha256=[None] * n)
    table = pa.table(columns, schema=base_schema())
    for name in ("image_emb", "text_emb"):
        emb = rng.standard_normal((int(ok.sum()), dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        table = table.append_column(pa.field(name, pa.list_(pa.float16(), dim)), fixed_list(emb, ok, dim))
    path = embedding_path(config.output, shard)
    errors = int((~ok).sum())
    meta = {"stage": "embed", resume.KEY: digest("synthetic", shard, n, dim, seed), "encoder": encoder(dim),
            "shard": shard, "config_hash": "synthetic", "reader_hash": "synthetic",
            "package_version": package_version(), "samples": n, "errors": errors}
    write_parquet_atomic(table, path, meta, EMBED_ROW_GROUP_ROWS)  # as the embed stage writes them
    return path


def write_scores(config: CleanConfig, shard: str, number: int, n: int, dim: int, seed: int) -> str:
    rng = np.random.default_rng((seed, number, 0))  # the same keys and errors as the embeddings
    columns, ok = _base(shard, number, n, rng)
    scores = np.random.default_rng((seed, number, 1))
    for name in FLOAT_SCORES:
        columns[name] = pa.array(scores.random(n).astype(np.float32), pa.float32(), mask=~ok)
    for name in DOUBLE_SCORES:
        columns[name] = pa.array(scores.beta(5, 2, n), pa.float64(), mask=~ok)
    for name in ANCHOR_COLUMNS:
        columns[name] = [None] * n
    columns["encoder_cosine"] = pa.nulls(n, pa.float32())  # the synthetic encoder is not aligned
    table = pa.table(columns, schema=score_schema())
    path = scores_path(config.output, shard)
    meta = {"stage": "score", resume.KEY: digest("synthetic-score", shard, n, dim, seed), "shard": shard,
            "encoder": encoder(dim), "checkpoint_sha256": CHECKPOINT_SHA,
            "embedding_cache_key": digest("synthetic", shard, n, dim, seed), "package_version": package_version()}
    write_parquet_atomic(table, path, meta)
    return path


def write_outputs(config: CleanConfig, shard: str, run_wide: select.RunWide) -> dict[str, Any]:
    """A shard's annotated/filtered Parquet and completion marker as the write stage makes them, without its tars
    (no input shard exists): decisions, output keys and counts by the write stage's own functions."""
    from bicro_clean.pipeline.parquet_io import read_columns, read_stage_metadata

    sid, source = shard_id(shard), scores_path(config.output, shard)
    table, scores_meta = read_columns(source, None), read_stage_metadata(source) or {}
    keys = table["key"].to_pylist()
    new_keys = output_keys(keys, np.asarray(table["status"].to_pylist(), dtype=object) == "ok", sid,
                           run_wide.duplicates)
    key = write_key(config, scores_meta, run_wide.cutoff, [(k, v) for k, v in zip(keys, new_keys) if k != v])
    plan = {**select.shard_decisions(config, table, run_wide.cutoff), "table": table, "output_key": new_keys,
            "truth_clean": [None] * table.num_rows, "output_shard": [None] * table.num_rows}
    annotated = annotated_table(table, plan, None)
    paths = [annotated_path(config.output, sid), filtered_path(config.output, sid)]
    write_annotated(annotated, *paths, _metadata(config, shard, scores_meta, key))
    outputs = [output_entry(config, paths[0], "annotated", annotated.num_rows),
               output_entry(config, paths[1], "filtered", kept_rows(annotated).num_rows)]
    renamed = [{"shard": shard, "key": k, "output_key": v} for k, v, d in
               zip(keys, new_keys, plan["decision"]) if k != v and d == select.KEEP]
    result = {"shard": shard, "shard_id": sid, resume.KEY: key, "fingerprint": None,
              "checkpoint_sha256": scores_meta.get("checkpoint_sha256"),
              "cutoff": run_wide.cutoff.as_dict() if run_wide.cutoff else None, "counts": _counts(plan),
              "reading": reading_report(table), "outputs": outputs, "renamed_keys": renamed}
    write_json_atomic(result_path(config.output, sid), result)
    return result
