"""Run-wide steps across partitions: a crawl run as separate runs (one per host, each with its own output folder and
the same `checkpoint:`), then decided as if it had been one run.

Each partition's run already decides its rows alone; two things depend on the whole crawl and so on every
partition: the keep-fraction cutoff (the top fraction of *all* scored rows) and the keys repeated across shards
(renamed `<shard_id>_<key>` in the cleaned shards). `plan` computes both from every partition's score and
embedding files with the select stage's own run-wide functions (`select.global_cutoff`, `select.duplicate_keys`:
bounded merges, memory independent of the crawl); `apply` reruns one partition's write, finalize and report with
them. The partitions' rows are then those of one run over all their shards with that checkpoint and rule: the
same scores (same checkpoint, same embeddings), the same cutoff row, the same renamed keys.

A plan is a small JSON file, so the apply can run where each partition lives: one host computes the plan
(`bicro-clean select --from 'parts/*' --keep-fraction F --write-plan plan.json`), each host applies it to its
own folder (`bicro-clean select --from parts/3 --plan plan.json`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import fsspec

from bicro_clean.pipeline import owner, resume, select
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.finalize import finalize_stage, total_counts
from bicro_clean.pipeline.layout import MANIFEST, embedding_path, scores_path
from bicro_clean.pipeline.outlock import output_lock
from bicro_clean.pipeline.parquet_io import digest, join
from bicro_clean.pipeline.pack import pack_stage
from bicro_clean.pipeline.run import InProcess, input_shards, report_stage
from bicro_clean.pipeline.shard_groups import outputs, write_group
from bicro_clean.pipeline.shards import shard_id
from bicro_clean.pipeline.writers import read_json

logger = logging.getLogger(__name__)

PLAN_VERSION = 1


class PartitionError(ValueError):
    """Partitions that cannot be decided together; the message is one line."""


@dataclass(frozen=True)
class Partition:
    """One finished partition run: its output folder, its own configuration, its shards and its checkpoint."""

    output: str
    config: dict[str, Any]  # as its manifest records it (no output, runner or speed-only settings)
    shards: list[str]
    checkpoint: str  # the folder inside `output` its scores were made with
    checkpoint_sha256: str


def partition_folders(patterns: list[str]) -> list[str]:
    """The output folders `patterns` name: folders or globs of folders (local or fsspec URLs), sorted, no repeats.
    A glob keeps only folders; a pattern that names nothing is an error (a typo would silently shrink the crawl)."""
    folders: list[str] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        paths = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
        found = [fs.unstrip_protocol(p) if "://" in pattern else p for p in paths if fs.isdir(p)]
        if not found:
            raise PartitionError(f"--from {pattern!r} names no output folder")
        folders += [f.rstrip("/") for f in found]
    return sorted(set(folders))


def load_partition(output: str) -> Partition:
    """A finished partition (its manifest.json is written last); PartitionError for an unfinished or foreign one."""
    manifest = read_json(join(output, MANIFEST))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise PartitionError(f"{output} has no readable {MANIFEST}: its run has not finished (or it is not a "
                             "bicro-clean output folder)")
    checkpoint = manifest.get("checkpoint") or {}
    if not checkpoint.get("path") or not checkpoint.get("sha256"):
        raise PartitionError(f"{output}: its {MANIFEST} names no checkpoint")
    config = _config(manifest["config"], output)
    return Partition(output, manifest["config"], input_shards(config, note=False), join(output, checkpoint["path"]),
                     checkpoint["sha256"])


def _config(recorded: dict[str, Any], output: str, select_section: dict[str, Any] | None = None) -> CleanConfig:
    data = {**recorded, "output": output}
    if select_section is not None:
        data["select"] = select_section
    config = CleanConfig.model_validate(data)
    config.out.overwrite = True  # the plan re-decides these rows on purpose: their owner record follows the rule
    return config


def _common(partitions: list[Partition]) -> None:
    """Scores are comparable across partitions only when one model made them all, on one encoder's embeddings."""
    shas = {p.checkpoint_sha256 for p in partitions}
    if len(shas) != 1:
        raise PartitionError(f"the partitions were scored with {len(shas)} different checkpoints; run every "
                             "partition with the same --checkpoint")
    encoders = {json.dumps(p.config.get("embed", {}).get("encoder")) for p in partitions}
    if len(encoders) != 1:
        raise PartitionError(f"the partitions were embedded with {len(encoders)} different encoders")
    shards = [shard_id(s) for p in partitions for s in p.shards]
    if len(shards) != len(set(shards)):
        repeated = sorted({s for s in shards if shards.count(s) > 1})
        raise PartitionError(f"shard {repeated[0]} is in more than one partition; partitions must be disjoint")


def plan(partitions: list[Partition], rule: dict[str, Any]) -> dict[str, Any]:
    """The run-wide values over every partition: the select rule (`rule`: select settings on top of the
    partitions' own, which must agree where they are not given), its keep-fraction cutoff and the repeated keys."""
    if not partitions:
        raise PartitionError("no partitions")
    _common(partitions)
    sections = {json.dumps(p.config.get("select", {}), sort_keys=True) for p in partitions}
    if len(sections) != 1 and not {"column", "threshold", "keep_fraction"} <= set(rule):
        raise PartitionError("the partitions were run with different select settings; give --column, --threshold "
                             "and --keep-fraction for all of them")
    section = {**partitions[0].config.get("select", {}), **rule}
    settings = _config(partitions[0].config, partitions[0].output, section).select
    select.check_column(settings.column)
    scores = [scores_path(p.output, s) for p in partitions for s in p.shards]
    cutoff = None
    if settings.keep_fraction is not None:
        cutoff = select.global_cutoff(scores, settings.column, settings.keep_fraction)
    repeated = select.duplicate_keys([embedding_path(p.output, s) for p in partitions for s in p.shards])
    return {"version": PLAN_VERSION, "select": settings.model_dump(mode="json"),
            "cutoff": cutoff.as_dict() if cutoff else None, "repeated_keys": sorted(repeated),
            "checkpoint_sha256": partitions[0].checkpoint_sha256, "partitions": [p.output for p in partitions],
            "shards": sum(len(p.shards) for p in partitions)}


def _run_wide(the_plan: dict[str, Any]) -> select.RunWide:
    cutoff = select.Cutoff(**the_plan["cutoff"]) if the_plan.get("cutoff") else None
    return select.RunWide(cutoff, frozenset(the_plan.get("repeated_keys", [])))


def check_plan(the_plan: Any, partition: Partition) -> None:
    if not isinstance(the_plan, dict) or the_plan.get("version") != PLAN_VERSION or "select" not in the_plan:
        raise PartitionError("not a plan written by `bicro-clean select --write-plan`")
    if the_plan.get("checkpoint_sha256") != partition.checkpoint_sha256:
        raise PartitionError(f"{partition.output} was scored with another checkpoint than the plan's partitions")
    if partition.output not in the_plan.get("partitions", []):
        logger.warning("%s was not among the partitions the plan was computed from; its rows are not counted in "
                       "the cutoff", partition.output)


def apply(partition: Partition, the_plan: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one partition's decisions and outputs with the plan's rule, cutoff and repeated keys: its write
    (shards whose decisions did not change are skipped by their cache key), pack, finalize and report. Each
    partition is its own output folder, so its cleaned shards are numbered from shards/00000.tar with their own
    sizes.json: a trainer lists every partition's brace range (open_clip: joined by `::`)."""
    check_plan(the_plan, partition)
    config = _config(partition.config, partition.output, the_plan["select"])
    ids = [shard_id(s) for s in partition.shards]
    run_wide = _run_wide(the_plan)
    with output_lock(config.output, digest(resume.config_hash(config), ids)):
        owner.claim_output(config)
        owner.retire_manifest(config.output)  # the outputs it lists are rewritten now; finalize writes it again
        executor = InProcess()
        written = outputs(executor.map(write_group, executor.shard_batches(partition.shards), config, run_wide))
        cleaned = pack_stage(executor, config, partition.shards, run_wide)
        manifest = finalize_stage(config, ids, partition.checkpoint)
        report = report_stage(config, manifest)
    return {"output": partition.output, "manifest": manifest, "report": report, "cleaned_shards": cleaned,
            "shards": len(written),
            "cached_shards": sum(w["cached"] for w in written), **total_counts(written)}
