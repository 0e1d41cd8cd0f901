"""The whole cleaning run as plain functions: embed -> fit -> (keep-fraction cutoff) -> score per shard -> finalize.

Each stage is cached on a hash of what it reads, so rerunning the same command redoes nothing and leaves every
file byte-identical, and a crashed run resumes where it stopped. Per-shard work (`score_shard_stage`) depends
only on its shard plus two small run-wide values computed up front (the keep-fraction cutoff and the set of keys
that occur in more than one shard), so shards can run as independent tasks on different machines.

Output layout under `config.output`:
    embeddings/<shard_id>.parquet     embed stage (pipeline.embed)
    checkpoint/bicro-<fit_hash>/      fitted BiCro model (BiCroModel.save folder)
    scores/<shard_id>.parquet         score columns per sample (cache shared by the cutoff pass)
    annotated/<shard_id>.parquet      every input sample with decision, reason and scores
    filtered/<shard_id>.parquet       kept rows of annotated
    shards/<shard_id>-NNNNN.tar       cleaned WebDataset shards (+ NNNNN_stats.json)
    results/<shard_id>.json           per-shard result (the stage's cache marker, written last)
    keep_keys.parquet, manifest.json  finalize
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections import Counter
from typing import Any, Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bicro_clean.pipeline import select
from bicro_clean.pipeline.config import CleanConfig, ReaderConfig
from bicro_clean.pipeline.embed import embed_shards
from bicro_clean.pipeline.layout import embedding_path
from bicro_clean.pipeline.parquet_io import (
    atomic_output,
    digest,
    file_sha256,
    input_fingerprint,
    join,
    package_version,
    read_stage_metadata,
)
from bicro_clean.pipeline.score import (
    CHECKPOINT_FILES,
    FLOAT_SCORES,
    checkpoint_sha256,
    device,
    encoder_info,
    fixed_list_matrix,
    load_model,
    pair_key,
    score_shard,
)
from bicro_clean.pipeline.shards import RawSample, expand_shard_spec, iter_shard, shard_id
from bicro_clean.pipeline.writers import (
    ShardedTarWriter,
    json_object,
    kept_rows,
    read_json,
    sample_members,
    write_annotated,
    write_json_atomic,
    write_keep_keys,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR, ANNOTATED_DIR, FILTERED_DIR, SHARDS_DIR, RESULTS_DIR = (
    "checkpoint", "annotated", "filtered", "shards", "results")
KEEP_KEYS, MANIFEST = "keep_keys.parquet", "manifest.json"
# Reader reasons that mean the shard itself broke (pipeline.shards.REASONS).
SHARD_REASONS = ("shard_truncated", "shard_corrupt", "shard_unreadable")
# Embed settings that change speed, not results (the embed cache ignores them too).
_RUNTIME_ONLY = {"device", "num_workers", "progress", "batch_size", "threads"}


# ---------------------------------------------------------------- run-wide helpers


def config_hash(config: CleanConfig) -> str:
    """Hash of everything that shapes the outputs; not input/output paths (inputs are fingerprinted apart)."""
    return digest(config.model_dump(mode="json", exclude={"input": True, "output": True, "runner": True,
                                                           "embed": _RUNTIME_ONLY}))


def input_shards(config: CleanConfig) -> list[str]:
    return list(expand_shard_spec(config.input, allow_pipe=config.reader.allow_pipe))


def relative(config: CleanConfig, path: str) -> str:
    """Paths inside the output folder as written in results and the manifest (no machine-specific prefix)."""
    return path[len(config.output.rstrip("/")) + 1:]


def _fingerprint(url: str) -> str | None:
    try:
        return input_fingerprint(url)
    except (OSError, ValueError):  # pipe: URLs and unreachable inputs have no cheap identity
        return None


def _exists(path: str) -> bool:
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    return fs.exists(local)


# ---------------------------------------------------------------- fit


def fit_hash(config: CleanConfig, embedding_paths: list[str]) -> str:
    keys = [encoder_info(p).get("cache_key") for p in embedding_paths]
    return digest(keys, config.bicro.model_dump(mode="json"), package_version())


def checkpoint_path(output: str, fit_id: str) -> str:
    return join(output, CHECKPOINT_DIR, f"bicro-{fit_id}")


def _read_columns(path: str, columns: list[str]) -> pa.Table:
    with fsspec.open(path, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def _ok_count(path: str) -> int:
    return int(pc.sum(pc.equal(_read_columns(path, ["status"])["status"], "ok")).as_py() or 0)


FIT_SAMPLE_STREAM = 0x5A3B1E  # any constant no other seeded draw uses


def sample_positions(counts: list[int], sample: int, seed: int) -> list[np.ndarray]:
    """Per file, the positions among its ok rows to fit on: all, or a seeded uniform sample over the run."""
    total = sum(counts)
    if sample == 0 or sample >= total:
        return [np.arange(c) for c in counts]
    # A stream of its own: with default_rng(seed) the sample was the first `sample` of the same permutation that
    # pipeline.noise draws with that seed, so a benchmark's fit sample held every injected noisy pair.
    chosen = np.sort(np.random.default_rng((seed, FIT_SAMPLE_STREAM)).choice(total, size=sample, replace=False))
    bounds = np.cumsum([0, *counts])
    return [chosen[(chosen >= lo) & (chosen < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def _file_pairs(path: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    table = _read_columns(path, ["shard", "key", "status", "image_emb", "text_emb"])
    ok = table.filter(pc.equal(table["status"], "ok")).take(pa.array(positions, type=pa.int64()))
    keys = [pair_key(s, k) for s, k in zip(ok["shard"].to_pylist(), ok["key"].to_pylist())]
    return fixed_list_matrix(ok["image_emb"]), fixed_list_matrix(ok["text_emb"]), keys


def load_fit_pairs(embedding_paths: list[str], sample: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image/text embeddings and run-wide keys of the ok pairs BiCro is fitted on, in file then row order."""
    counts = [_ok_count(p) for p in embedding_paths]
    parts = [_file_pairs(p, pos) for p, pos in zip(embedding_paths, sample_positions(counts, sample, seed))]
    if not parts or sum(len(k) for _, _, k in parts) < 2:
        raise ValueError("fewer than 2 usable pairs to fit BiCro on (every sample failed to read?)")
    image = np.concatenate([p[0] for p in parts]).astype(np.float32)
    text = np.concatenate([p[1] for p in parts]).astype(np.float32)
    return image, text, [k for p in parts for k in p[2]]


def run_encoder(embedding_paths: list[str]) -> dict[str, Any]:
    """The encoder every embedding file was made with; mixing encoders in one run is an error."""
    encoders = {digest(encoder_info(p)["encoder"]): encoder_info(p)["encoder"] for p in embedding_paths}
    if len(encoders) != 1:
        raise ValueError(f"embedding files come from {len(encoders)} different encoders; re-embed with one")
    return next(iter(encoders.values()))


def save_checkpoint(model: Any, path: str) -> None:
    """`model.save` into local scratch, then copy file by file, each atomically, model.json last.

    The folder name carries the fit hash and `model.json` marks it complete, so a crash mid-copy leaves a folder
    that `checkpoint_complete` rejects and the next run refits into.
    """
    with tempfile.TemporaryDirectory() as scratch:
        model.save(scratch)
        for name in CHECKPOINT_FILES:
            with atomic_output(join(path, name)) as tmp, fsspec.open(tmp, "wb") as dst, \
                    open(os.path.join(scratch, name), "rb") as src:
                shutil.copyfileobj(src, dst)


def checkpoint_complete(path: str) -> bool:
    return all(_exists(join(path, name)) for name in CHECKPOINT_FILES)


def fit_stage(config: CleanConfig, embedding_paths: list[str]) -> str:
    """Fit BiCro on all ok pairs (or a `bicro.fit_sample` sample); skipped when this exact fit exists."""
    from bicro_clean.models.bicro import BiCroParams, fit_bicro

    path = checkpoint_path(config.output, fit_hash(config, embedding_paths))
    if checkpoint_complete(path):
        logger.info("fit: reusing %s", path)
        return path
    image, text, keys = load_fit_pairs(embedding_paths, config.bicro.fit_sample, config.bicro.seed)
    params = BiCroParams(**config.bicro.model_dump(exclude={"fit_sample"}))
    aligned = bool(run_encoder(embedding_paths).get("aligned"))
    logger.info("fit: %d pairs on %s (aligned encoder: %s)", len(keys), device(), aligned)
    model, _ = fit_bicro(image, text, params, keys=keys, aligned=aligned, device=device())
    save_checkpoint(model, path)
    return path


# ---------------------------------------------------------------- run-wide passes before per-shard work


def duplicate_keys(embedding_paths: Iterable[str]) -> frozenset[str]:
    """Keys of ok rows that occur in more than one shard (within a shard the reader already rejects repeats)."""
    parts = []
    for path in embedding_paths:
        table = _read_columns(path, ["key", "status"])
        parts.append(pc.unique(table.filter(pc.equal(table["status"], "ok"))["key"].combine_chunks()))
    if not parts:
        return frozenset()
    counts = pc.value_counts(pa.chunked_array(parts, type=pa.string()).combine_chunks())
    return frozenset(c["values"].as_py() for c in counts if c["counts"].as_py() > 1)


def _score_column(path: str, column: str) -> np.ndarray:
    # float32 as stored (4 bytes a row for the whole run); nulls (error rows) become NaN
    return _read_columns(path, [column])[column].to_numpy().astype(np.float32)


def _tied(path: str, column: str, value: float) -> list[tuple[str, str]]:
    table = _read_columns(path, ["shard", "key", column])
    hit = table[column].to_numpy().astype(np.float32) == value
    return list(zip(np.asarray(table["shard"].to_pylist())[hit], np.asarray(table["key"].to_pylist())[hit]))


def global_cutoff(score_paths: list[str], column: str, fraction: float) -> select.Cutoff:
    """The keep-fraction cutoff over every shard: one pass for the values, one for the rows tied at the cut."""
    values = np.concatenate([_score_column(p, column) for p in score_paths]) if score_paths \
        else np.zeros(0, np.float32)
    cut = select.cut_value(values, fraction)
    ties = [] if cut is None else [t for p in score_paths for t in _tied(p, column, cut)]
    return select.cutoff_from_columns(values, ties, fraction)


# ---------------------------------------------------------------- per shard


def output_keys(keys: list[str], ok: np.ndarray, sid: str, duplicates: frozenset[str]) -> list[str]:
    """The key each sample gets in the cleaned shards: its own, or `<shard_id>_<key>` if another shard has it."""
    prefix = sid.replace(".", "_")  # a dot would end the WebDataset key early
    return [f"{prefix}_{k}" if good and k in duplicates else k for k, good in zip(keys, ok)]


def _decisions(config: CleanConfig, table: pa.Table, cutoff: select.Cutoff | None) -> dict[str, Any]:
    column = config.select.column
    ok = np.asarray(table["status"].to_pylist(), dtype=object) == "ok"
    values, p_clean = (table[c].to_numpy().astype(np.float64) for c in (column, "p_clean"))
    shards, keys = np.asarray(table["shard"].to_pylist()), np.asarray(table["key"].to_pylist())
    rule = dict(column=column, threshold=config.select.threshold, clean_threshold=config.bicro.clean_threshold,
                cutoff=cutoff)
    decision, reason = select.decide(ok, np.asarray(table["reason"].to_pylist(), dtype=object), values, p_clean,
                                     shards, keys, **rule)
    detail = select.drop_details(reason, values, p_clean, **rule)
    detail = [d if good else reader for d, good, reader in zip(detail, ok, table["detail"].to_pylist())]
    return {"ok": ok, "decision": decision, "reason": reason, "detail": detail}


JSON_SCORES = (*FLOAT_SCORES, "anchor_key_i2t", "anchor_key_t2i", "encoder_cosine")


def bicro_json(scores: dict[str, list], row: int, key: str, new_key: str) -> dict[str, Any]:
    """What a kept sample's JSON gets under "bicro": its scores (nulls left out) and, if renamed, its old key."""
    out = {c: scores[c][row] for c in JSON_SCORES if scores[c][row] is not None}
    if new_key != key:
        out["original_key"] = key
    return out


def _truth_clean(sample: RawSample) -> bool | None:
    """Ground truth from benchmark shards (make-shards --noise-rate), passed through for evaluation."""
    value = json_object(sample.members.get("json")).get("truth_clean")
    return value if isinstance(value, bool) else None


def copy_kept(shard: str, reader: ReaderConfig, table: pa.Table, plan: dict[str, Any],
              writer: ShardedTarWriter) -> None:
    """Stream the input shard once: copy kept samples into `writer`, note every sample, collect truth_clean.

    The embeddings (and so `table`) have exactly one row per reader item in reader order, so rows align by
    position; the key check catches an input shard that changed since it was embedded.
    """
    keys, decision, reason = table["key"].to_pylist(), plan["decision"], plan["reason"]
    scores = {c: table[c].to_pylist() for c in JSON_SCORES}
    row = -1
    for row, item in enumerate(iter_shard(shard, reader)):
        raw = isinstance(item, RawSample)
        if row >= len(keys) or item.key != keys[row] or (decision[row] == select.KEEP and not raw):
            raise RuntimeError(f"{shard}: item {row} ({item.key!r}) does not match its embeddings; re-embed")
        if raw:
            plan["truth_clean"][row] = _truth_clean(item)
        if decision[row] == select.KEEP:
            new_key = plan["output_key"][row]
            members = sample_members(item.key, item.members, item.names, new_key,
                                     bicro_json(scores, row, item.key, new_key))
            renamed = {"shard": shard, "key": item.key, "output_key": new_key} if new_key != item.key else None
            plan["output_shard"][row] = writer.add(members, renamed)
        writer.note(reason[row])
    if row + 1 != len(keys):
        raise RuntimeError(f"{shard}: read {row + 1} items but embedded {len(keys)}; re-embed")


def annotated_table(table: pa.Table, plan: dict[str, Any], embeddings: pa.Table | None) -> pa.Table:
    """Scores table + decisions, in the documented column order (embeddings only when asked for)."""
    columns: dict[str, pa.Array] = {"shard": table["shard"], "key": table["key"],
                                    "output_key": pa.array(plan["output_key"], pa.string()),
                                    "output_shard": pa.array(plan["output_shard"], pa.string()),
                                    "decision": pa.array(list(plan["decision"]), pa.string()),
                                    "reason": pa.array(list(plan["reason"]), pa.string()),
                                    "detail": pa.array(plan["detail"], pa.string())}
    for name in ("caption", "width", "height", "url", "uid", *FLOAT_SCORES, "anchor_key_i2t", "anchor_key_t2i",
                 "encoder_cosine"):
        columns[name] = table[name]
    columns["truth_clean"] = pa.array(plan["truth_clean"], pa.bool_())
    if embeddings is not None:
        columns.update(image_emb=embeddings["image_emb"], text_emb=embeddings["text_emb"])
    return pa.table(columns)


def _stage_hash(config: CleanConfig, scores: str, cutoff: select.Cutoff | None,
                renamed: list[tuple[str, str]]) -> str:
    meta = read_stage_metadata(scores) or {}
    return digest(meta.get("cache_key"), config_hash(config), cutoff.as_dict() if cutoff else None,
                  renamed, package_version())


def _cached_result(config: CleanConfig, sid: str, stage_hash: str) -> dict[str, Any] | None:
    result = read_json(join(config.output, RESULTS_DIR, f"{sid}.json"))
    if not result or result.get("stage_hash") != stage_hash:
        return None
    if not all(_exists(join(config.output, o["path"])) for o in result["outputs"]):
        return None
    annotated = join(config.output, ANNOTATED_DIR, f"{sid}.parquet")
    if (read_stage_metadata(annotated) or {}).get("stage_hash") != stage_hash:
        return None  # the annotated file was replaced behind our back (e.g. by a different run)
    return {**result, "cached": True}


def _remove_stale_tars(config: CleanConfig, sid: str, keep: set[str]) -> None:
    """Tars of an earlier run of this shard that produced more of them (the name pattern is this shard's only)."""
    fs, _, (base,) = fsspec.get_fs_token_paths(join(config.output, SHARDS_DIR))
    for pattern in (f"{sid}-[0-9][0-9][0-9][0-9][0-9].tar", f"{sid}-[0-9][0-9][0-9][0-9][0-9]_stats.json"):
        for path in fs.glob(f"{base}/{pattern}"):
            if path.rsplit("/", 1)[-1] not in keep:
                logger.info("removing stale %s", path)
                fs.rm(path)


def _output_entry(config: CleanConfig, path: str, kind: str, count: int | None) -> dict[str, Any]:
    return {"path": relative(config, path), "kind": kind, "count": count, "sha256": file_sha256(path)}


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


def _metadata(config: CleanConfig, shard: str, scores: str, stage_hash: str) -> dict[str, Any]:
    meta = read_stage_metadata(scores) or {}
    return {"stage": "annotate", "shard": shard, "stage_hash": stage_hash, "config_hash": config_hash(config),
            "encoder": meta.get("encoder"), "checkpoint_sha256": meta.get("checkpoint_sha256"),
            "package_version": package_version(), "select": config.select.model_dump(mode="json")}


def _write_outputs(config: CleanConfig, shard: str, sid: str, table: pa.Table, plan: dict[str, Any],
                   meta: dict[str, Any]) -> list[dict[str, Any]]:
    writer = ShardedTarWriter(join(config.output, SHARDS_DIR), sid, config.out.maxcount, config.out.maxsize)
    try:
        copy_kept(shard, config.reader, table, plan, writer)
        tars = writer.close(shard)
    except BaseException:
        writer.abort()
        raise
    _remove_stale_tars(config, sid, {f"{t.name}{s}" for t in tars for s in (".tar", "_stats.json")})
    embeddings = _read_columns(embedding_path(config.output, shard), ["image_emb", "text_emb"]) \
        if config.out.keep_embeddings else None
    annotated = annotated_table(table, plan, embeddings)
    paths = [join(config.output, d, f"{sid}.parquet") for d in (ANNOTATED_DIR, FILTERED_DIR)]
    write_annotated(annotated, *paths, meta)
    outputs = [_output_entry(config, paths[0], "annotated", annotated.num_rows),
               _output_entry(config, paths[1], "filtered", kept_rows(annotated).num_rows)]
    for tar in tars:
        outputs.append(_output_entry(config, tar.path, "tar", tar.successes))
        outputs.append(_output_entry(config, tar.path[:-len(".tar")] + "_stats.json", "stats", tar.count))
    return outputs


def _shard_result(config: CleanConfig, shard: str, scores: str, stage_hash: str, plan: dict[str, Any],
                  cutoff: select.Cutoff | None, keys: list[str]) -> dict[str, Any]:
    outputs = _write_outputs(config, shard, shard_id(shard), plan["table"], plan,
                             _metadata(config, shard, scores, stage_hash))
    renamed = [{"shard": shard, "key": k, "output_key": n} for k, n, d in
               zip(keys, plan["output_key"], plan["decision"]) if k != n and d == select.KEEP]
    return {"shard": shard, "shard_id": shard_id(shard), "stage_hash": stage_hash, "fingerprint": _fingerprint(shard),
            "checkpoint_sha256": (read_stage_metadata(scores) or {}).get("checkpoint_sha256"),
            "cutoff": cutoff.as_dict() if cutoff else None, "counts": _counts(plan),
            "reading": reading_report(plan["table"]), "outputs": outputs, "renamed_keys": renamed}


def score_shard_stage(config: CleanConfig, shard: str, checkpoint_path: str, cutoff: select.Cutoff | None = None,
                      duplicates: frozenset[str] = frozenset(), model: Any | None = None) -> dict[str, Any]:
    """Score, decide and write one input shard's annotated/filtered Parquet and cleaned tars.

    `cutoff` (keep_fraction runs) and `duplicates` (keys present in several shards) are the run-wide values
    from `global_cutoff` / `duplicate_keys`; pass `model` to avoid reloading the checkpoint per shard.
    Skipped (result returned with cached=True) when its outputs exist with the same hashes.
    """
    sid = shard_id(shard)
    scores = score_shard(shard, config.output, checkpoint_path, model)
    table = _read_columns(scores, None)
    keys = table["key"].to_pylist()
    new_keys = output_keys(keys, np.asarray(table["status"].to_pylist(), dtype=object) == "ok", sid, duplicates)
    stage_hash = _stage_hash(config, scores, cutoff, [(k, n) for k, n in zip(keys, new_keys) if k != n])
    cached = _cached_result(config, sid, stage_hash)
    if cached is not None:
        return cached
    plan = {**_decisions(config, table, cutoff), "table": table, "output_key": new_keys,
            "truth_clean": [None] * table.num_rows, "output_shard": [None] * table.num_rows}
    result = _shard_result(config, shard, scores, stage_hash, plan, cutoff, keys)
    write_json_atomic(join(config.output, RESULTS_DIR, f"{sid}.json"), result)
    return {**result, "cached": False}


# ---------------------------------------------------------------- finalize and the whole run


def total_counts(shard_results: list[dict[str, Any]]) -> dict[str, Any]:
    by_reason: Counter = Counter()
    for result in shard_results:
        by_reason.update(result["counts"]["by_reason"])
    totals = {k: sum(r["counts"][k] for r in shard_results) for k in ("in", "kept", "dropped", "errors")}
    return {**totals, "by_reason": dict(sorted(by_reason.items()))}


def _checkpoint_entry(config: CleanConfig, shard_results: list[dict[str, Any]],
                      checkpoint_path: str | None) -> dict[str, Any]:
    if checkpoint_path is None:
        return {"sha256": next((r["checkpoint_sha256"] for r in shard_results), None)}
    return {"path": relative(config, checkpoint_path), "sha256": checkpoint_sha256(checkpoint_path)}


def manifest(config: CleanConfig, shard_results: list[dict[str, Any]], checkpoint: dict[str, Any],
             keep_keys: dict[str, Any]) -> dict[str, Any]:
    """The run's record: inputs, every output with its hash, counts, renamed keys, config and checkpoint."""
    return {
        "package_version": package_version(), "config_hash": config_hash(config), "checkpoint": checkpoint,
        "config": config.model_dump(mode="json", exclude={"output": True, "runner": True, "embed": _RUNTIME_ONLY}),
        "cutoff": next((r["cutoff"] for r in shard_results), None),
        "inputs": [{"url": r["shard"], "shard_id": r["shard_id"], "fingerprint": r["fingerprint"],
                    **r.get("reading", {})} for r in shard_results],
        "outputs": [o for r in shard_results for o in r["outputs"]] + [keep_keys],
        "counts": total_counts(shard_results),
        "renamed_keys": [k for r in shard_results for k in r["renamed_keys"]],
    }


def finalize_stage(config: CleanConfig, shard_results: list[dict[str, Any]],
                   checkpoint_path: str | None = None) -> str:
    """Write keep_keys.parquet and manifest.json from the per-shard results (in input shard order)."""
    filtered = [join(config.output, o["path"]) for r in shard_results for o in r["outputs"] if o["kind"] == "filtered"]
    keep_path = join(config.output, KEEP_KEYS)
    keep_keys = _output_entry(config, keep_path, "keep_keys", write_keep_keys(filtered, keep_path))
    record = manifest(config, shard_results, _checkpoint_entry(config, shard_results, checkpoint_path), keep_keys)
    path = join(config.output, MANIFEST)
    write_json_atomic(path, record)
    return path


def load_shard_result(config: CleanConfig, sid: str) -> dict[str, Any]:
    """The per-shard result a finished `score_shard_stage` left in OUTPUT/results/ (how tasks hand over work)."""
    result = read_json(join(config.output, RESULTS_DIR, f"{sid}.json"))
    if result is None:
        raise FileNotFoundError(f"no result for shard {sid}: its write stage has not finished")
    return {**result, "cached": True}


def check_run_config(config: CleanConfig) -> None:
    """Fail before any work on what can be checked without data."""
    select.check_column(config.select.column)


def write_report_if_available(config: CleanConfig, manifest_path: str) -> Any:
    """The HTML report, when pipeline.report exists (it is optional; its own import errors still surface)."""
    if importlib.util.find_spec("bicro_clean.pipeline.report") is None:
        return None
    from bicro_clean.pipeline.report import write_report

    return write_report(config, manifest_path)


def _check_select(config: CleanConfig, encoder: dict[str, Any]) -> None:
    select.check_column(config.select.column)
    if config.select.column == "encoder_cosine" and not encoder.get("aligned"):
        raise ValueError("select.column=encoder_cosine needs an aligned encoder (open_clip); "
                         f"{encoder.get('spec')} is not aligned")


def run_pipeline(config: CleanConfig, report: bool = True) -> dict[str, Any]:
    """embed -> fit -> score every shard -> (keep-fraction cutoff) -> decide and write per shard -> finalize
    (-> report.html unless `report` is False: the load test measures the data path alone)."""
    select.check_column(config.select.column)
    embed_shards(config)
    shards = input_shards(config)
    embeddings = [embedding_path(config.output, s) for s in shards]
    _check_select(config, run_encoder(embeddings))
    checkpoint = fit_stage(config, embeddings)
    model = load_model(checkpoint)
    scores = [score_shard(s, config.output, checkpoint, model) for s in shards]
    cutoff = global_cutoff(scores, config.select.column, config.select.keep_fraction) \
        if config.select.keep_fraction is not None else None
    duplicates = duplicate_keys(embeddings)
    results = [score_shard_stage(config, s, checkpoint, cutoff, duplicates, model) for s in shards]
    manifest = finalize_stage(config, results, checkpoint)
    report_path = write_report_if_available(config, manifest) if report else None
    return {"output": config.output, "manifest": manifest, "checkpoint": checkpoint, "report": report_path,
            "shards": len(results), "cached_shards": sum(r["cached"] for r in results),
            **total_counts(results)}
