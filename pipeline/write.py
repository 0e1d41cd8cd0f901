"""Write stage, per input shard: scores + decisions -> the shard's part (kept samples and rows) for the pack step.

The input shard is streamed once: kept samples are copied member for member into the shard's part (their JSON
gains a "bicro" object with the scores; pipeline/parts.py), every sample gets its row in the part's table, and the
result (counts, how far reading got, the part) is written last as the write's marker. A shard's write depends only
on its own scores plus the run-wide values (`select.RunWide`), so shards can be written as independent tasks on
different machines; the pack step (pipeline/pack.py) then numbers the cleaned shards over the whole run and writes
annotated/, filtered/ and the shard's completion marker in results/.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from bicro_clean.pipeline import estimates, progress, resume, select
from bicro_clean.pipeline.config import CleanConfig, ReaderConfig
from bicro_clean.pipeline.content_id import SampleCheck
from bicro_clean.pipeline.layout import embedding_path, part_path, relative, result_path, scores_path
from bicro_clean.pipeline.parquet_io import file_sha256, input_fingerprint, package_version, read_columns
from bicro_clean.pipeline.parquet_io import write_parquet_atomic
from bicro_clean.pipeline.parquet_io import read_stage_metadata
from bicro_clean.pipeline.score import DOUBLE_SCORES, FLOAT_SCORES
from bicro_clean.pipeline.shards import RawSample, shard_id, shard_ids
from bicro_clean.pipeline.tar_reader import iter_shard
from bicro_clean.pipeline.parts import PartWriter
from bicro_clean.pipeline.writers import json_object, read_json, sample_members, write_json_atomic

logger = logging.getLogger(__name__)

# Reader reasons that mean the shard itself broke (pipeline.shards.REASONS).
SHARD_REASONS = ("shard_truncated", "shard_corrupt", "shard_unreadable")
JSON_SCORES = (*DOUBLE_SCORES, *FLOAT_SCORES, "anchor_key_i2t", "anchor_key_t2i", "encoder_cosine")


def output_keys(keys: list[str], ok: np.ndarray, sid: str, duplicates: frozenset[str]) -> list[str]:
    """The key each sample gets in the cleaned shards: its own, or `<shard_id>_<key>` if another shard has it."""
    prefix = sid.replace(".", "_")  # a dot would end the WebDataset key early
    return [f"{prefix}_{k}" if good and k in duplicates else k for k, good in zip(keys, ok)]


def bicro_json(scores: dict[str, list], row: int, key: str, new_key: str) -> dict[str, Any]:
    """What a kept sample's JSON gets under "bicro": its scores (nulls left out) and, if renamed, its old key."""
    out = {c: scores[c][row] for c in JSON_SCORES if scores[c][row] is not None}
    if new_key != key:
        out["original_key"] = key
    return out


def _truth_clean(doc: dict[str, Any]) -> bool | None:
    """Ground truth from benchmark shards (make-shards --noise-rate), passed through for evaluation."""
    value = doc.get("truth_clean")
    return value if isinstance(value, bool) else None


def _noise_kind(doc: dict[str, Any]) -> str | None:
    """The injected noise kind of a benchmark sample (make-shards writes it beside truth_clean): the report's
    detection per kind."""
    value = doc.get("noise_kind")
    return value[:32] if isinstance(value, str) else None


def copy_kept(shard: str, reader: ReaderConfig, table: pa.Table, plan: dict[str, Any],
              writer: PartWriter, check: SampleCheck) -> None:
    """Stream the input shard once: copy kept samples into `writer` (with their rows), collect truth_clean.

    The embeddings (and so `table`) have exactly one row per reader item in reader order, so rows align by
    position. Every sample read must be the one embedded: same key at the same place, same member digest
    (`check`); otherwise the input changed since it was embedded, and InputChangedError stops the write before
    anything of this shard is published (pipeline/content_id.py).
    """
    keys, decision = table["key"].to_pylist(), plan["decision"]
    scores = {c: table[c].to_pylist() for c in JSON_SCORES}
    row = -1
    for row, item in enumerate(iter_shard(shard, reader)):
        raw = isinstance(item, RawSample)
        if row >= len(keys) or item.key != keys[row] or (decision[row] == select.KEEP and not raw):
            raise check.changed(f"item {row} ({item.key!r})")
        if raw:
            check.verify_row(row, item)
            doc = json_object(item.members.get("json"))  # parsed once: truth_clean here, the kept copy below
            plan["truth_clean"][row] = _truth_clean(doc)
            plan["noise_kind"][row] = _noise_kind(doc)
        if decision[row] == select.KEEP:
            new_key = plan["output_key"][row]
            members = sample_members(item.key, item.members, item.names, new_key,
                                     bicro_json(scores, row, item.key, new_key), doc)
            writer.add(row, members)
    if row + 1 != len(keys):
        raise check.changed(f"{row + 1} items where {len(keys)} were embedded")


def annotated_table(table: pa.Table, plan: dict[str, Any], embeddings: pa.Table | None) -> pa.Table:
    """Scores table + decisions, in the documented column order (embeddings only when asked for)."""
    columns: dict[str, pa.Array] = {"shard": table["shard"],
                                    "shard_id": pa.array(shard_ids(table["shard"].to_pylist()), pa.string()),
                                    "key": table["key"],
                                    "output_key": pa.array(plan["output_key"], pa.string()),
                                    # filled in by the pack step, once the run's cleaned shards are numbered
                                    "output_shard": pa.nulls(table.num_rows, pa.string()),
                                    "output_index": pa.nulls(table.num_rows, pa.int64()),
                                    "decision": pa.array(list(plan["decision"]), pa.string()),
                                    "reason": pa.array(list(plan["reason"]), pa.string()),
                                    "detail": pa.array(plan["detail"], pa.string())}
    for name in ("caption", "width", "height", "url", "uid", *DOUBLE_SCORES, *FLOAT_SCORES, "anchor_key_i2t",
                 "anchor_key_t2i", "encoder_cosine"):
        columns[name] = table[name]
    columns["truth_clean"] = pa.array(plan["truth_clean"], pa.bool_())
    columns["noise_kind"] = pa.array(plan.get("noise_kind", [None] * table.num_rows), pa.string())
    if embeddings is not None:
        columns.update(image_emb=embeddings["image_emb"], text_emb=embeddings["text_emb"])
    return pa.table(columns)


def write_key(config: CleanConfig, scores_meta: dict[str, Any], cutoff: select.Cutoff | None,
              renamed: list[tuple[str, str]]) -> str:
    return resume.stage_key(scores_meta.get(resume.KEY), resume.config_hash(config),
                            cutoff.as_dict() if cutoff else None, renamed, package_version())


def output_entry(config: CleanConfig, path: str, kind: str, count: int | None,
                 sha256: str | None = None) -> dict[str, Any]:
    """`sha256`: the file's hash when its writer took it on the way out (the tars), else the file is read."""
    return {"path": relative(config.output, path), "kind": kind, "count": count,
            "sha256": sha256 or file_sha256(path)}


def _counts(plan: dict[str, Any]) -> dict[str, Any]:
    decisions = Counter(plan["decision"])
    return {"in": len(plan["decision"]), "kept": decisions[select.KEEP], "dropped": decisions[select.DROP],
            "errors": decisions[select.ERROR], "by_reason": dict(sorted(Counter(plan["reason"]).items()))}


def reading_report(table: pa.Table) -> dict[str, Any]:
    """How far the reader got through one input shard, from its rows (one per member group, in shard order).

    `samples_read`: member groups read to the end (usable or not); `samples_lost`: groups cut off by shard
    damage; `damage`: the shard-level row (empty key), or None when the shard was read to its end marker.
    Rows reconcile: samples_read + samples_lost + (1 if damage else 0) == counts.in. Samples beyond the damage
    are never reached, so their number is unknown; the detail says at which byte reading stopped.
    """
    keys, reasons, details = (table[c].to_pylist() for c in ("key", "reason", "detail"))
    lost = sum(1 for key, reason in zip(keys, reasons) if key and reason in SHARD_REASONS)
    damage = next(({"reason": reason, "detail": detail} for key, reason, detail in zip(keys, reasons, details)
                   if not key and reason in SHARD_REASONS), None)
    return {"samples_read": sum(1 for key in keys if key) - lost, "samples_lost": lost, "damage": damage}


def _metadata(config: CleanConfig, shard: str, scores_meta: dict[str, Any], key: str) -> dict[str, Any]:
    # The annotated Parquet records the write key under its historical names ("annotate", "stage_hash"): the
    # files are a published format, and renaming would change every output's bytes. Resume reads the marker.
    return {"stage": "annotate", "shard": shard, "stage_hash": key, "config_hash": resume.config_hash(config),
            "encoder": scores_meta.get("encoder"), "checkpoint_sha256": scores_meta.get("checkpoint_sha256"),
            "package_version": package_version(), "select": config.select.model_dump(mode="json")}


def _write_part(config: CleanConfig, shard: str, sid: str, table: pa.Table, plan: dict[str, Any],
                meta: dict[str, Any]) -> dict[str, Any]:
    """The shard's part: its kept samples' tar and index, and its rows (annotated/ less the output columns)."""
    writer = PartWriter(part_path(config.output, sid, ".tar"))
    try:
        check = SampleCheck(shard, embedding_path(config.output, shard))  # what the embed stage read
        copy_kept(shard, config.reader, table, plan, writer, check)
        part = writer.close(part_path(config.output, sid, ".index.parquet"), {"shard": shard})
    except BaseException:
        writer.abort()
        raise
    embeddings = read_columns(embedding_path(config.output, shard), ["image_emb", "text_emb"]) \
        if config.out.keep_embeddings else None
    write_parquet_atomic(annotated_table(table, plan, embeddings), part_path(config.output, sid, ".parquet"), meta)
    return {**part, "path": relative(config.output, part_path(config.output, sid, ".tar"))}


def _fingerprint(url: str) -> str | None:
    try:
        return input_fingerprint(url)
    except (OSError, ValueError):  # pipe: URLs and unreachable inputs have no cheap identity
        return None


def _shard_result(config: CleanConfig, shard: str, scores_meta: dict[str, Any], key: str, plan: dict[str, Any],
                  cutoff: select.Cutoff | None, keys: list[str]) -> dict[str, Any]:
    part = _write_part(config, shard, shard_id(shard), plan["table"], plan,
                       _metadata(config, shard, scores_meta, key))
    renamed = [{"shard": shard, "shard_id": shard_id(shard), "key": k, "output_key": n} for k, n, d in
               zip(keys, plan["output_key"], plan["decision"]) if k != n and d == select.KEEP]
    return {"shard": shard, "shard_id": shard_id(shard), resume.KEY: key, "fingerprint": _fingerprint(shard),
            "checkpoint_sha256": scores_meta.get("checkpoint_sha256"),
            "cutoff": cutoff.as_dict() if cutoff else None, "counts": _counts(plan),
            "reading": reading_report(plan["table"]), "part": part, "outputs": [], "renamed_keys": renamed,
            "estimate_sums": estimates.shard_sums(plan["table"]["clean_score"], plan["decision"])}


def summary(result: dict[str, Any], cached: bool) -> dict[str, Any]:
    """What a write hands back to the sequence (the whole result stays in its marker file for finalize)."""
    return {"shard": result["shard"], "shard_id": result["shard_id"], "counts": result["counts"], "cached": cached}


def write_stage(shard: str, config: CleanConfig, run_wide: select.RunWide) -> dict[str, Any]:
    """Decide and write one input shard from its scores file (the score stage has written it).

    Skipped (cached=True) when the shard's completion marker records the same key and its outputs are intact, or
    when its part, written with that key, still waits for the pack step.
    """
    sid = shard_id(shard)
    scores = scores_path(config.output, shard)
    table = read_columns(scores, None)
    scores_meta = read_stage_metadata(scores) or {}
    keys = table["key"].to_pylist()
    new_keys = output_keys(keys, np.asarray(table["status"].to_pylist(), dtype=object) == "ok", sid,
                           run_wide.duplicates)
    key = write_key(config, scores_meta, run_wide.cutoff, [(k, n) for k, n in zip(keys, new_keys) if k != n])
    marker = part_path(config.output, sid, ".json")
    done = resume.completed_result(result_path(config.output, sid), key, config.output, "annotated") \
        or _pending_part(config, sid, marker, key)
    if done is not None:
        progress.report("write", advance=1)
        return summary(done, cached=True)
    plan = {**select.shard_decisions(config, table, run_wide.cutoff), "table": table, "output_key": new_keys,
            "truth_clean": [None] * table.num_rows, "noise_kind": [None] * table.num_rows}
    result = _shard_result(config, shard, scores_meta, key, plan, run_wide.cutoff, keys)
    write_json_atomic(marker, result)
    progress.report("write", advance=1)
    return summary(result, cached=False)


def _pending_part(config: CleanConfig, sid: str, marker: str, key: str) -> dict[str, Any] | None:
    """The write's marker, if made with `key` and its part's files are all there (the pack step has not run)."""
    result = read_json(marker)
    if not isinstance(result, dict) or result.get(resume.KEY) != key:
        return None
    files = (".tar", ".parquet", ".index.parquet")
    return result if all(resume.exists(part_path(config.output, sid, suffix)) for suffix in files) else None
