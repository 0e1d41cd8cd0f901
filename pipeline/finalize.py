"""Finalize stage: the per-shard completion markers -> keep_keys.parquet, keep_uids.npy and manifest.json.

keep_uids.npy is DataComp's subset format (a sorted numpy array of dtype ``u8,u8``: a 32-hex-char uid's first 16
hex digits as the high word, the next 16 as the low), written only when every kept sample has such a uid;
otherwise manifest.json's `keep_uids` says why (how many kept samples have no uid, or none that DataComp takes).

The manifest is the run's record, built from the markers on disk, so it is the same whichever runner or machine
wrote the shards: manifest.json (counts by reason, renamed keys, the config, the checkpoint, the run's
`estimates` from clean_score (pipeline/estimates.py), the run-wide outputs with their SHA-256) and
manifest_shards.parquet (per input shard: how far it was read and every output with its SHA-256;
pipeline/manifest_shards.py). The markers are read on a thread pool and streamed into the table, so
memory does not grow with the manifest.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bicro_clean.pipeline import estimates, resume
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.layout import (
    ANNOTATED_DIR,
    FILTERED_DIR,
    KEEP_KEYS,
    MANIFEST,
    RESULTS_DIR,
    SHARDS_DIR,
    SIZES,
    relative,
    result_path,
)
from bicro_clean.pipeline.manifest_shards import ShardTable
from bicro_clean.pipeline.pack import relative_cleaned
from bicro_clean.pipeline.parallel_io import imap
from bicro_clean.pipeline.parquet_io import atomic_output, join, package_version
from bicro_clean.pipeline.score import checkpoint_sha256
from bicro_clean.pipeline.uid_merge import SortedRuns, write_npy
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


def write_keep_uids(keep_keys_path: str, path: str) -> int | str:
    """keep_keys' uids as DataComp's sorted ``u8,u8`` array at `path`; the row count, or why nothing was written
    (a stale file removed): no kept row, or kept rows without a valid uid (counted; logged once, with the first).
    Sorted in bounded runs and merged into the file (pipeline.uid_merge): memory independent of the kept count."""
    runs = SortedRuns(UID_DTYPE)
    kept, bad = 0, Counter()  # bad: kept rows without a usable uid, by kind
    try:
        with fsspec.open(keep_keys_path, "rb") as fh:
            # 64k rows a batch: uid_words holds 32 8-byte nibbles a row (16 MB here, 256 MB at 1M rows)
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=1 << 16, columns=["shard", "key", "uid"]):
                kept += batch.num_rows
                words = None if sum(bad.values()) else uid_words(batch.column(2))
                if words is None:  # from the first bad uid on, the rest is only counted
                    _count_bad_uids(batch, bad)
                else:
                    runs.add(words)
        if sum(bad.values()) or not kept:
            reason = _no_uids_reason(kept, bad)
            logger.info("finalize: no %s: %s", KEEP_UIDS, reason)
            _remove_stale(path)
            return reason
        with atomic_output(path) as tmp, fsspec.open(tmp, "wb") as out:
            write_npy(out, UID_DTYPE, runs.total, runs.merged())
        return runs.total
    finally:
        runs.close()


def _count_bad_uids(batch: pa.RecordBatch, bad: Counter) -> None:
    """Count the batch's kept rows without a uid (`missing`) or with one DataComp cannot take (`invalid`); log the
    first such row of the run."""
    uids = batch.column(2)
    good = pc.fill_null(pc.match_substring_regex(uids, _HEX_UID), False)
    rows = batch.filter(pc.invert(good))
    if rows.num_rows and not bad:
        first = rows.slice(0, 1).to_pylist()[0]
        logger.info("finalize: first kept sample without a 32-hex-char uid: shard %s key %r uid %r", first["shard"],
                    first["key"], first["uid"])
    bad["missing"] += uids.null_count
    bad["invalid"] += rows.num_rows - uids.null_count


def _no_uids_reason(kept: int, bad: Counter) -> str:
    """Why keep_uids.npy was not written, in the words the summary and manifest.json show."""
    if not kept:
        return "not written: no sample was kept"
    parts = []
    if bad["missing"]:
        parts.append(f"{bad['missing']:,} of {kept:,} kept samples have no uid (img2dataset's `uid` field in the "
                     "sample's .json)")
    if bad["invalid"]:
        parts.append(f"{bad['invalid']:,} of {kept:,} kept samples have a uid that is not 32 hex digits "
                     "(DataComp's format)")
    return "not written: " + "; ".join(parts)


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


@dataclass
class Collected:
    """What the run-wide record needs from the shards' results, gathered while they stream past: totals, not the
    results themselves (those go to manifest_shards.parquet row by row)."""

    by_reason: Counter = field(default_factory=Counter)
    totals: Counter = field(default_factory=Counter)
    renamed_keys: list[dict[str, Any]] = field(default_factory=list)
    cutoff: dict[str, Any] | None = None
    shards: int = 0
    filtered: list[str] = field(default_factory=list)  # filtered Parquet paths, in input shard order
    sums: dict[str, float] = field(default_factory=estimates.empty_sums)  # clean_score sums (pipeline.estimates)
    unsummed: list[str] = field(default_factory=list)  # annotated files of results that recorded no sums
    listed: set[str] = field(default_factory=set)  # every output path a shard's result names

    def add(self, result: dict[str, Any]) -> None:
        if not self.shards:
            self.cutoff = result["cutoff"]
        self.shards += 1
        self.by_reason.update(result["counts"]["by_reason"])
        self.totals.update({k: result["counts"][k] for k in ("in", "kept", "dropped", "errors")})
        self.renamed_keys += result["renamed_keys"]
        self.filtered += [o["path"] for o in result["outputs"] if o["kind"] == "filtered"]
        self.listed.update(o["path"] for o in result["outputs"])
        self.unsummed += estimates.collect(self.sums, result)

    def counts(self) -> dict[str, Any]:
        return {**{k: self.totals[k] for k in ("in", "kept", "dropped", "errors")},
                "by_reason": dict(sorted(self.by_reason.items()))}


def collect(config: CleanConfig, shard_ids: list[str], table: ShardTable) -> Collected:
    """Every shard's result, read on a bounded thread pool in input order, into `table` and the totals."""
    collected = Collected()
    for result in imap(lambda sid: load_shard_result(config, sid), shard_ids):
        table.add(result)
        collected.add(result)
    return collected


def manifest(config: CleanConfig, collected: Collected, checkpoint: dict[str, Any],
             run_wide: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's summary record: config, checkpoint, cutoff, counts, renamed keys and the run-wide outputs with
    their hashes (keep_keys.parquet, keep_uids.npy when written, manifest_shards.parquet: the per-shard part)."""
    return {
        "package_version": package_version(), "config_hash": resume.config_hash(config), "checkpoint": checkpoint,
        "config": config.model_dump(mode="json", exclude={"output": True, "runner": True,
                                                          "embed": resume.RUNTIME_ONLY}),
        "cutoff": collected.cutoff, "shards": collected.shards, "outputs": run_wide,
        "counts": collected.counts(), "renamed_keys": collected.renamed_keys,
        "estimates": estimates.estimates(estimates.from_annotated(
            collected.sums, [join(config.output, path) for path in collected.unsummed])),
    }


def remove_outputs_of_other_shards(config: CleanConfig, shard_ids: list[str], results: list[dict[str, Any]]) -> int:
    """`remove_unlisted` with the output paths that `results` name."""
    return remove_unlisted(config, shard_ids, {o["path"] for r in results for o in r["outputs"]})


def remove_unlisted(config: CleanConfig, shard_ids: list[str], listed: set[str]) -> int:
    """Delete files in annotated/, filtered/, shards/ and results/ that this run's shards did not write (left by an
    earlier run on more inputs), so the folder holds exactly what the manifest lists; the count removed.
    Caches (embeddings/, scores/, checkpoint/) stay: they are keyed and cost compute to rebuild. A writer's
    `.tmp-*` file in progress is left alone. The run's shards/sizes.json stays (the manifest lists it too)."""
    keep = set(listed) | {f"{SHARDS_DIR}/{SIZES}"}
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


def finalize_stage(config: CleanConfig, shard_ids: list[str], checkpoint_path: str,
                   execution: dict[str, Any] | None = None) -> str:
    """Write keep_keys.parquet, keep_uids.npy (when every kept sample has a DataComp uid) and manifest.json from
    the shards' results (in input shard order), after removing outputs of shards this run does not have.
    `execution`: workers lost and tasks retried on the way (pipeline.shard_groups.execution), recorded as the
    manifest's `execution` entry; None (nothing went wrong) leaves it out."""
    with ShardTable(config.output) as table:  # the per-shard part of the manifest, streamed
        collected = collect(config, shard_ids, table)
    remove_unlisted(config, shard_ids, collected.listed)
    keep_path = join(config.output, KEEP_KEYS)
    filtered = [join(config.output, path) for path in collected.filtered]
    run_wide = [output_entry(config, keep_path, "keep_keys", write_keep_keys(filtered, keep_path))]
    uids_path = join(config.output, KEEP_UIDS)
    uids = write_keep_uids(keep_path, uids_path)
    if isinstance(uids, int):
        run_wide.append(output_entry(config, uids_path, "keep_uids", uids))
    run_wide.append(output_entry(config, table.path, "shards_table", table.rows))
    cleaned = relative_cleaned(config)  # shards/{00000..N}.tar for a trainer, and their sizes.json
    if cleaned is not None:
        run_wide.append(output_entry(config, join(config.output, cleaned["sizes"]), "sizes", cleaned["samples"]))
    record = manifest(config, collected, _checkpoint_entry(config, checkpoint_path), run_wide)
    record["cleaned_shards"] = cleaned
    record["keep_uids"] = KEEP_UIDS if isinstance(uids, int) else uids  # the file, or why there is none
    if execution:
        record["execution"] = execution
    path = join(config.output, MANIFEST)
    write_json_atomic(path, record)
    return path
