"""Where every stage's files live under a run's output folder: the one place that names them.

    embeddings/<shard_id>.parquet     embed: one row per input sample, errors included
    checkpoint/bicro-<fit key>/       fit: the BiCro model (BiCroModel.save folder)
    scores/<shard_id>.parquet         score: score columns per sample
    annotated/<shard_id>.parquet      write: every input sample with decision, reason and scores
    filtered/<shard_id>.parquet       write: kept rows of annotated
    shards/<shard_id>-NNNNN.tar       write: cleaned WebDataset shards (+ NNNNN_stats.json)
    results/<shard_id>.json           write: per-shard result, the stage's completion marker (written last)
    keep_keys.parquet, manifest.json  finalize
    report.html                       report
    run-config.json                   the configuration that owns the folder (pipeline/owner.py), before any work

Paths are strings so that local folders and fsspec URLs are handled alike.
"""

from __future__ import annotations

from bicro_clean.pipeline.parquet_io import join
from bicro_clean.pipeline.shards import shard_id

EMBED_DIR, SCORE_DIR, CHECKPOINT_DIR = "embeddings", "scores", "checkpoint"
ANNOTATED_DIR, FILTERED_DIR, SHARDS_DIR, RESULTS_DIR = "annotated", "filtered", "shards", "results"
KEEP_KEYS, MANIFEST, REPORT = "keep_keys.parquet", "manifest.json", "report.html"
RUN_CONFIG = "run-config.json"


def embedding_path(output: str, shard: str) -> str:
    return join(output, EMBED_DIR, f"{shard_id(shard)}.parquet")


def scores_path(output: str, shard: str) -> str:
    return join(output, SCORE_DIR, f"{shard_id(shard)}.parquet")


def checkpoint_path(output: str, fit_key: str) -> str:
    return join(output, CHECKPOINT_DIR, f"bicro-{fit_key}")


def annotated_path(output: str, sid: str) -> str:
    return join(output, ANNOTATED_DIR, f"{sid}.parquet")


def filtered_path(output: str, sid: str) -> str:
    return join(output, FILTERED_DIR, f"{sid}.parquet")


def result_path(output: str, sid: str) -> str:
    return join(output, RESULTS_DIR, f"{sid}.json")


def relative(output: str, path: str) -> str:
    """A path inside the output folder as results and the manifest record it (no machine-specific prefix)."""
    return path[len(output.rstrip("/")) + 1:]
