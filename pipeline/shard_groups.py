"""The per-shard stages (embed, score, write) run on groups of shards: the unit of work a runner schedules.

A runner schedules groups, not shards, so its bookkeeping (a Prefect task run costs ~15 ms of CPU and ~70 ms of
wall time) grows with the workers, not with the crawl. There are several groups per worker (`GROUPS_PER_WORKER`),
so a slow worker holds back only a small part of a stage, and a lost or a newly added worker rebalances: the
runner hands the remaining groups to whoever is free. A group runs each of its shards through the stage, and the
stage skips a shard whose output already records its cache key, so a group run again after its worker was lost
redoes only its unfinished shards.

Each group returns a `GroupResult`: per shard what the stage hands on and whether it was found finished, plus the
pairs it computed. The run builds the console's stage lines and the summary's counts from these results, so they
hold whichever process or machine ran the group (progress reports reach only the process that draws the bars).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from bicro_clean.models.encoders import shared_encoder
from bicro_clean.pipeline import progress, select
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.embed import embed_shards
from bicro_clean.pipeline.layout import embedding_path, scores_path
from bicro_clean.pipeline.score import score_shards
from bicro_clean.pipeline.shards import shard_id
from bicro_clean.pipeline.write import write_stage

logger = logging.getLogger(__name__)

# Groups per worker and stage: enough that a straggler or a lost worker costs a fraction of a stage and a worker
# that joins late still finds work; few enough that per-task costs (a task run; for embed, starting the decode
# workers) stay small beside the work.
GROUPS_PER_WORKER = 4


@dataclass
class GroupResult:
    """What one group of a per-shard stage did. `outputs`: per shard what the stage hands on (the embeddings or
    scores path, write's summary); `cached`: per shard, found finished and reused; `pairs`: pairs computed here.
    The runner fills in `attempt` (its run count for this group's task, >1 after a retry) and `lost_workers` (the
    workers that died while running it: it was run again elsewhere)."""

    stage: str
    shards: list[str]
    outputs: list[Any]
    cached: list[bool]
    pairs: int = 0
    attempt: int = 1
    lost_workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def retried(self) -> bool:
        return self.attempt > 1 or bool(self.lost_workers)


def split_even(shards: list[str], parts: int) -> list[list[str]]:
    """`shards` in at most `parts` contiguous groups whose sizes differ by at most one, order kept (the fit sample
    reads the embedding files in shard order)."""
    parts = max(1, min(parts, len(shards)))
    size, extra = divmod(len(shards), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [shards[bounds[i]:bounds[i + 1]] for i in range(parts)]


def plan_groups(shards: list[str], workers: int) -> list[list[str]]:
    """The groups a stage is mapped over on `workers` concurrent workers: `GROUPS_PER_WORKER` per worker."""
    return split_even(shards, GROUPS_PER_WORKER * max(1, workers))


def embed_group(shards: list[str], config: CleanConfig) -> GroupResult:
    """Embed a group of shards through one loader (one encoder per process, one set of decode workers)."""
    encoder = shared_encoder(config.embed.encoder, config.embed.device, config.embed.autocast)
    done = {result.shard: result for result in embed_shards(config, encoder, shards=shards)}
    cached = [done[shard].cached for shard in shards]
    pairs = sum(done[shard].samples for shard, reused in zip(shards, cached) if not reused)
    return GroupResult("embed", shards, [embedding_path(config.output, s) for s in shards], cached, pairs)


def score_group(shards: list[str], config: CleanConfig, checkpoint_path: str) -> GroupResult:
    """Score a group of shards with the run's checkpoint (rows of consecutive shards scored together)."""
    cached = score_shards(shards, config.output, checkpoint_path, requested=config.embed.device)
    return GroupResult("score", shards, [scores_path(config.output, s) for s in shards], cached)


def write_group(shards: list[str], config: CleanConfig, run_wide: select.RunWide) -> GroupResult:
    """Decide and write a group of shards from their scores files."""
    written = [write_stage(shard, config, run_wide) for shard in shards]
    pairs = sum(w["counts"]["in"] for w in written if not w["cached"])
    return GroupResult("write", shards, written, [w["cached"] for w in written], pairs)


def outputs(results: list[GroupResult]) -> list[Any]:
    """Every shard's output, in input order."""
    return [output for result in results for output in result.outputs]


def tally(results: list[GroupResult]) -> progress.Tally:
    return progress.Tally(shards=sum(len(r.shards) for r in results), cached=sum(sum(r.cached) for r in results),
                          pairs=sum(r.pairs for r in results), tasks=len(results),
                          retried=sum(r.retried for r in results))


def execution(results: list[GroupResult]) -> dict[str, Any]:
    """Workers lost and groups run again, from the groups' results: `lost_workers` (each: the worker, the stage,
    the group's shards and `redone`, those the rerun found unfinished) and `retries` per stage (groups run more
    than once and their shards). Empty when nothing went wrong, so an undisturbed run's manifest is the same
    under every runner."""
    lost = [{**worker, "stage": r.stage, "shards": [shard_id(s) for s in r.shards],
             "redone": [shard_id(s) for s, reused in zip(r.shards, r.cached) if not reused]}
            for r in results for worker in r.lost_workers]
    retries: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.retried:
            entry = retries.setdefault(r.stage, {"tasks": 0, "shards": []})
            entry["tasks"] += 1
            entry["shards"] += [shard_id(s) for s in r.shards]
    return {"lost_workers": lost, "retries": retries} if lost or retries else {}
