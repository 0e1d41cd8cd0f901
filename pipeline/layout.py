"""Where every stage's files live under a run's output folder: the one place that names them.

    embeddings/<shard_id>.parquet     embed: one row per input sample, errors included
    checkpoint/bicro-<fit key>/       fit: the BiCro model (BiCroModel.save folder)
    scores/<shard_id>.parquet         score: score columns per sample
    annotated/<shard_id>.parquet      write: every input sample with decision, reason and scores
    filtered/<shard_id>.parquet       write: kept rows of annotated
    shards/NNNNN.tar                  pack: cleaned WebDataset shards numbered over the whole run (+ NNNNN_stats.json)
    shards/sizes.json                 pack: samples per cleaned shard, as open_clip's loader reads it
    shards/.parts/<shard_id>.*        write -> pack: one input shard's kept samples (tar, table, marker) until
                                      they are packed; `<shard_id>.index.parquet` (each kept sample's row and
                                      bytes) stays, so a later run can plan again without rereading the input
    results/<shard_id>.json           pack: per-shard result, the shard's completion marker (written last)
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
PARTS_DIR, SIZES = ".parts", "sizes.json"


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


def part_path(output: str, sid: str, suffix: str) -> str:
    """A write's hand-over to the pack step: `.tar` (kept samples), `.parquet` (the shard's rows before their
    output shard is known), `.json` (the write's marker), `.index.parquet` (kept samples' rows and bytes)."""
    return join(output, SHARDS_DIR, PARTS_DIR, f"{sid}{suffix}")


def output_shard_path(output: str, name: str, suffix: str = ".tar") -> str:
    """A cleaned shard (`00003` -> shards/00003.tar) or its stats (suffix `_stats.json`)."""
    return join(output, SHARDS_DIR, f"{name}{suffix}")


def relative(output: str, path: str) -> str:
    """A path inside the output folder as results and the manifest record it (no machine-specific prefix)."""
    return path[len(output.rstrip("/")) + 1:]
