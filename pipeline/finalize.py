"""Finalize stage: the per-shard completion markers -> keep_keys.parquet and manifest.json.

The manifest is the run's record: inputs (with how far each was read), every output with its SHA-256, counts by
reason, renamed keys, the config and the checkpoint. It is built from the markers on disk, so it is the same
whichever runner or machine wrote the shards.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from bicro_clean.pipeline import resume
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.layout import KEEP_KEYS, MANIFEST, relative, result_path
from bicro_clean.pipeline.parquet_io import join, package_version
from bicro_clean.pipeline.score import checkpoint_sha256
from bicro_clean.pipeline.write import output_entry
from bicro_clean.pipeline.writers import read_json, write_json_atomic, write_keep_keys

logger = logging.getLogger(__name__)


def total_counts(shard_results: list[dict[str, Any]]) -> dict[str, Any]:
    by_reason: Counter = Counter()
    for result in shard_results:
        by_reason.update(result["counts"]["by_reason"])
    totals = {k: sum(r["counts"][k] for r in shard_results) for k in ("in", "kept", "dropped", "errors")}
    return {**totals, "by_reason": dict(sorted(by_reason.items()))}


def load_shard_result(config: CleanConfig, sid: str) -> dict[str, Any]:
    """The result a finished write left in its completion marker (how shard tasks hand over their work)."""
    result = read_json(result_path(config.output, sid))
    if result is None:
        raise FileNotFoundError(f"no result for shard {sid}: its write stage has not finished")
    return result


def _checkpoint_entry(config: CleanConfig, checkpoint_path: str) -> dict[str, Any]:
    return {"path": relative(config.output, checkpoint_path), "sha256": checkpoint_sha256(checkpoint_path)}


def manifest(config: CleanConfig, shard_results: list[dict[str, Any]], checkpoint: dict[str, Any],
             keep_keys: dict[str, Any]) -> dict[str, Any]:
    """The run's record: inputs, every output with its hash, counts, renamed keys, config and checkpoint."""
    return {
        "package_version": package_version(), "config_hash": resume.config_hash(config), "checkpoint": checkpoint,
        "config": config.model_dump(mode="json", exclude={"output": True, "runner": True,
                                                          "embed": resume.RUNTIME_ONLY}),
        "cutoff": next((r["cutoff"] for r in shard_results), None),
        "inputs": [{"url": r["shard"], "shard_id": r["shard_id"], "fingerprint": r["fingerprint"],
                    **r.get("reading", {})} for r in shard_results],
        "outputs": [o for r in shard_results for o in r["outputs"]] + [keep_keys],
        "counts": total_counts(shard_results),
        "renamed_keys": [k for r in shard_results for k in r["renamed_keys"]],
    }


def finalize_stage(config: CleanConfig, shard_ids: list[str], checkpoint_path: str) -> str:
    """Write keep_keys.parquet and manifest.json from the shards' results (in input shard order)."""
    results = [load_shard_result(config, sid) for sid in shard_ids]
    filtered = [join(config.output, o["path"]) for r in results for o in r["outputs"] if o["kind"] == "filtered"]
    keep_path = join(config.output, KEEP_KEYS)
    keep_keys = output_entry(config, keep_path, "keep_keys", write_keep_keys(filtered, keep_path))
    record = manifest(config, results, _checkpoint_entry(config, checkpoint_path), keep_keys)
    path = join(config.output, MANIFEST)
    write_json_atomic(path, record)
    return path
