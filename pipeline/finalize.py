"""Finalize stage: the per-shard completion markers -> keep_keys.parquet, keep_uids.npy and manifest.json.

keep_uids.npy is DataComp's subset format (a sorted numpy array of dtype ``u8,u8``: a 32-hex-char uid's first 16
hex digits as the high word, the next 16 as the low), written only when every kept sample has such a uid.

The manifest is the run's record: inputs (with how far each was read), every output with its SHA-256, counts by
reason, renamed keys, the config and the checkpoint. It is built from the markers on disk, so it is the same
whichever runner or machine wrote the shards.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bicro_clean.pipeline import resume
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.layout import (
    ANNOTATED_DIR,
    FILTERED_DIR,
    KEEP_KEYS,
    MANIFEST,
    RESULTS_DIR,
    SHARDS_DIR,
    relative,
    result_path,
)
from bicro_clean.pipeline.parquet_io import atomic_output, join, package_version
from bicro_clean.pipeline.score import checkpoint_sha256
from bicro_clean.pipeline.write import output_entry
from bicro_clean.pipeline.writers import read_json, write_json_atomic, write_keep_keys

logger = logging.getLogger(__name__)
KEEP_UIDS = "keep_uids.npy"
UID_DTYPE = np.dtype("u8,u8")  # DataComp's subset file: (high, low) 64-bit halves of the 128-bit uid
_HEX_UID = r"^[0-9a-fA-F]{32}$"
_NIBBLE = np.zeros(256, np.uint64)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint64)
_SHIFTS = np.arange(60, -4, -4, dtype=np.uint64)  # the 16 nibbles of a word, most significant first


def uid_words(uids: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """32-hex-char uids -> an (unsorted) ``u8,u8`` array, or None when any is null or not 32 hex digits."""
    uids = pa.concat_arrays(uids.chunks) if isinstance(uids, pa.ChunkedArray) else uids
    if len(uids) and (uids.null_count or not pc.all(pc.match_substring_regex(uids, _HEX_UID)).as_py()):
        return None
    lower = pc.utf8_lower(uids.cast(pa.string()))
    offsets = np.frombuffer(lower.buffers()[1], np.int32)[lower.offset:lower.offset + len(lower) + 1]
    data = np.frombuffer(lower.buffers()[2], np.uint8) if len(lower) else np.zeros(0, np.uint8)
    nibbles = _NIBBLE[data[offsets[0]:offsets[-1]]].reshape(-1, 32)  # every value is 32 bytes long (checked)
    words = np.zeros(len(lower), UID_DTYPE)
    words["f0"] = np.bitwise_or.reduce(nibbles[:, :16] << _SHIFTS, axis=1)
    words["f1"] = np.bitwise_or.reduce(nibbles[:, 16:] << _SHIFTS, axis=1)
    return words


def write_keep_uids(keep_keys_path: str, path: str) -> int | None:
    """keep_keys' uids as DataComp's sorted ``u8,u8`` array at `path`; the row count, or None (nothing written, a
    stale file removed) when there is no kept row or a kept row lacks a valid uid (logged once, with the first)."""
    parts = []
    with fsspec.open(keep_keys_path, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=1 << 20, columns=["shard", "key", "uid"]):
            words = uid_words(batch.column(2))
            if words is None:
                bad = batch.filter(pc.invert(pc.fill_null(pc.match_substring_regex(batch.column(2), _HEX_UID),
                                                          False))).slice(0, 1).to_pylist()[0]
                logger.info("finalize: no %s: not every kept sample has a 32-hex-char uid (first: shard %s key %r "
                            "uid %r)", KEEP_UIDS, bad["shard"], bad["key"], bad["uid"])
                return _remove_stale(path)
            parts.append(words)
    words = np.concatenate(parts) if parts else np.zeros(0, UID_DTYPE)
    if not len(words):
        logger.info("finalize: no %s: no sample was kept", KEEP_UIDS)
        return _remove_stale(path)
    words = words[np.lexsort((words["f1"], words["f0"]))]
    buffer = io.BytesIO()
    np.save(buffer, words)
    with atomic_output(path) as tmp, fsspec.open(tmp, "wb") as out:
        out.write(buffer.getvalue())
    return len(words)


def _remove_stale(path: str) -> None:
    """An earlier run's keep_uids.npy in this output folder would not match this run's keep_keys."""
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    if fs.exists(local):
        fs.rm(local)
    return None


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
             keep_keys: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """The run's record: inputs, every output with its hash, counts, renamed keys, config and checkpoint.
    `keep_keys`: the run-wide outputs' entries (keep_keys.parquet, keep_uids.npy when written)."""
    run_wide = keep_keys if isinstance(keep_keys, list) else [keep_keys]
    return {
        "package_version": package_version(), "config_hash": resume.config_hash(config), "checkpoint": checkpoint,
        "config": config.model_dump(mode="json", exclude={"output": True, "runner": True,
                                                          "embed": resume.RUNTIME_ONLY}),
        "cutoff": next((r["cutoff"] for r in shard_results), None),
        "inputs": [{"url": r["shard"], "shard_id": r["shard_id"], "fingerprint": r["fingerprint"],
                    **r.get("reading", {})} for r in shard_results],
        "outputs": [o for r in shard_results for o in r["outputs"]] + run_wide,
        "counts": total_counts(shard_results),
        "renamed_keys": [k for r in shard_results for k in r["renamed_keys"]],
    }


def remove_outputs_of_other_shards(config: CleanConfig, shard_ids: list[str], results: list[dict[str, Any]]) -> int:
    """Delete files in annotated/, filtered/, shards/ and results/ that this run's shards did not write (left by an
    earlier run on more inputs), so the folder holds exactly what manifest.json lists; the count removed.
    Caches (embeddings/, scores/, checkpoint/) stay: they are keyed and cost compute to rebuild. A writer's
    `.tmp-*` file in progress is left alone."""
    keep = {o["path"] for r in results for o in r["outputs"]}
    keep |= {relative(config.output, result_path(config.output, sid)) for sid in shard_ids}
    fs, root = fsspec.core.url_to_fs(config.output)
    removed = 0
    for folder in (ANNOTATED_DIR, FILTERED_DIR, SHARDS_DIR, RESULTS_DIR):
        base = f"{root.rstrip('/')}/{folder}"
        for path in fs.find(base) if fs.exists(base) else []:
            if path.rsplit("/", 1)[-1].startswith(".tmp-") or f"{folder}/{path[len(base) + 1:]}" in keep:
                continue
            fs.rm(path)
            removed += 1
    if removed:
        logger.warning("finalize: removed %d output files of shards that are not inputs of this run", removed)
    return removed


def finalize_stage(config: CleanConfig, shard_ids: list[str], checkpoint_path: str) -> str:
    """Write keep_keys.parquet, keep_uids.npy (when every kept sample has a DataComp uid) and manifest.json from
    the shards' results (in input shard order), after removing outputs of shards this run does not have."""
    results = [load_shard_result(config, sid) for sid in shard_ids]
    remove_outputs_of_other_shards(config, shard_ids, results)
    filtered = [join(config.output, o["path"]) for r in results for o in r["outputs"] if o["kind"] == "filtered"]
    keep_path = join(config.output, KEEP_KEYS)
    run_wide = [output_entry(config, keep_path, "keep_keys", write_keep_keys(filtered, keep_path))]
    uids_path = join(config.output, KEEP_UIDS)
    uid_count = write_keep_uids(keep_path, uids_path)
    if uid_count is not None:
        run_wide.append(output_entry(config, uids_path, "keep_uids", uid_count))
    record = manifest(config, results, _checkpoint_entry(config, checkpoint_path), run_wide)
    path = join(config.output, MANIFEST)
    write_json_atomic(path, record)
    return path
