"""Skip and resume: the one mechanism every stage uses to tell finished work from work to do.

Each stage's output records the *cache key* of everything that made it: a digest of its inputs' identities, the
settings that shape it and the package version. A stage whose output already records the key it would write is
done and is skipped, so rerunning a command redoes nothing and a killed run resumes where it stopped, on any
runner (the key lives with the output, not in a scheduler). Where the key is recorded:

    embed         the Parquet's bicro-clean metadata: `identity_key`, from the shard's up-front identity (what a
                  rerun compares before reading it), and `cache_key`, which adds the digest of the bytes read
                  (what every later stage builds on: pipeline/content_id.py)
    score         the Parquet's bicro-clean metadata (`cache_key`)
    fit           the checkpoint folder's name (`checkpoint/bicro-<key>`), complete once its files exist
    write         the shard's completion marker `results/<shard_id>.json` (`cache_key`), written last, whose
                  listed outputs must all exist, the annotated Parquet with the recorded SHA-256

Stages compute their keys with `stage_key` from the keys of what they read, so a change anywhere upstream
(input bytes, encoder, checkpoint, a config section) reaches every stage after it.
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.parquet_io import digest, file_sha256, join, read_stage_metadata
from bicro_clean.pipeline.writers import read_json

logger = logging.getLogger(__name__)

KEY = "cache_key"  # the one name of the key, in Parquet metadata and completion markers alike
# Embed settings that change speed, not results (excluded from the embed key and the config hash).
RUNTIME_ONLY = {"device", "num_workers", "progress", "batch_size", "threads"}


def stage_key(*parts: Any) -> str:
    """The cache key of a stage output made from `parts` (JSON-able values; order matters)."""
    return digest(*parts)


def config_hash(config: CleanConfig) -> str:
    """Hash of everything that shapes the outputs; not input/output paths (inputs are fingerprinted apart)."""
    return digest(config.model_dump(mode="json", exclude={"input": True, "output": True, "runner": True,
                                                           "embed": RUNTIME_ONLY}))


def recorded_key(parquet_path: str) -> str | None:
    """The key a stage's Parquet output records, or None when it is missing or unreadable."""
    return (read_stage_metadata(parquet_path) or {}).get(KEY)


def parquet_is_current(parquet_path: str, key: str) -> bool:
    return recorded_key(parquet_path) == key


def exists(path: str) -> bool:
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    return fs.exists(local)


def folder_is_complete(folder: str, files: tuple[str, ...]) -> bool:
    """A folder written file by file, its last file marking it complete (a crash leaves it incomplete)."""
    return all(exists(join(folder, name)) for name in files)


def completed_result(marker: str, key: str, output: str, checked_kind: str) -> dict[str, Any] | None:
    """The result a finished per-shard stage recorded in `marker`, if it was made with `key` and its outputs
    are still there; the output of kind `checked_kind` must also still have the recorded SHA-256 (another run
    writing into the same folder replaces it)."""
    result = read_json(marker)
    if not isinstance(result, dict) or result.get(KEY) != key:
        return None
    outputs = result.get("outputs", [])
    if not all(exists(join(output, o["path"])) for o in outputs):
        return None
    if any(o["kind"] == checked_kind and file_sha256(join(output, o["path"])) != o["sha256"] for o in outputs):
        logger.info("%s: %s was replaced since it was written; redoing", marker, checked_kind)
        return None
    return result
