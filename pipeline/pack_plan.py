"""The run's cleaned shards planned from the write stage's parts: which kept samples go to `shards/NNNNN.tar`.

Shards are numbered over the whole run in input order and cut as img2dataset and DataComp's resharder cut them:
every shard is full except the last. A shard is full when the next sample would pass `--maxcount` samples or
make the tar pass `--maxsize` bytes (a sample larger than maxsize alone still gets a shard). Counts alone are
known after select, but bytes are not: a kept sample's JSON gains its scores as it is written. So the plan is made
after the write stage, from the exact byte size of every kept sample that each write recorded in its part's index
(pipeline/parts.py), and the pack step then only copies byte ranges. The indexes are read one at a time, in input
order, each cut with a cumulative sum and a binary search per output shard: memory holds one input shard's sizes
and one small record per output shard and input shard, never a list of every sample.

Each input shard's rows are attributed to output shards for the img2dataset-style stats: a dropped row goes with
the kept sample before it (rows before a shard's first kept sample go with that sample; a shard that kept nothing
goes with the output shard open when it came).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bicro_clean.pipeline import resume
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.layout import output_shard_path, part_path, result_path
from bicro_clean.pipeline.parallel_io import imap
from bicro_clean.pipeline.parquet_io import digest, package_version
from bicro_clean.pipeline.parts import read_index
from bicro_clean.pipeline.writers import TAR_END, read_json

logger = logging.getLogger(__name__)
NAME_DIGITS = 5  # 00000.tar, as img2dataset names them; more digits past 100,000 shards


@dataclass(frozen=True)
class Segment:
    """Consecutive kept samples of one input shard that go to one output shard."""

    sid: str
    key: str  # the input shard's write key: what its part's bytes are
    rows: tuple[int, int]  # its annotated rows [start, end) attributed to the output shard (for the stats)
    kept: tuple[int, int]  # its kept samples [first, end), counted among the shard's kept samples
    offset: int  # where the first of them starts in the part
    length: int  # their bytes in the part
    position: int  # the first one's index in the output shard


@dataclass
class OutputPlan:
    """One cleaned shard: its segments in order, samples, member bytes, name and the key of its content."""

    index: int
    segments: list[Segment] = field(default_factory=list)
    count: int = 0
    payload: int = 0
    name: str = ""
    key: str = ""


@dataclass
class Plan:
    """The run's cleaned shards. `placed`: per input shard id, (output name, position, kept first, kept end) of
    its segments; `owned`: per input shard id, (name, content key) of the output shards whose first segment it
    holds (its completion marker lists them, so each output shard is listed once); `missing`: input shards whose bytes a shard that must
    be written again needs, but whose part an earlier run already packed and removed (they are written again)."""

    outputs: list[OutputPlan]
    placed: dict[str, list[tuple[str, int, int, int]]]
    owned: dict[str, list[tuple[str, str]]]
    missing: list[str]


def shard_marker(config: CleanConfig, sid: str) -> dict[str, Any]:
    """The write's marker while its part waits, else the shard's completion marker (both record its key)."""
    for path in (part_path(config.output, sid, ".json"), result_path(config.output, sid)):
        marker = read_json(path)
        if isinstance(marker, dict):
            return marker
    raise FileNotFoundError(f"no result for shard {sid}: its write stage has not finished")


def _load(config: CleanConfig, sid: str) -> tuple[str, str, int, np.ndarray, np.ndarray]:
    marker = shard_marker(config, sid)
    rows, sizes = read_index(part_path(config.output, sid, ".index.parquet"))
    return sid, marker[resume.KEY], int(marker["counts"]["in"]), rows, sizes


class _Cutter:
    """Cuts the kept samples, shard by shard, into output shards of at most maxcount samples and maxsize bytes."""

    def __init__(self, maxcount: int, maxsize: int) -> None:
        self.maxcount, self.maxsize = maxcount, maxsize
        self.outputs = [OutputPlan(0)]

    def add(self, sid: str, key: str, nrows: int, rows: np.ndarray, sizes: np.ndarray) -> None:
        if not len(sizes):  # nothing kept: its rows go with the open output shard
            self._segment(sid, key, (0, nrows), (0, 0), 0, 0)
            return
        ends = np.concatenate(([0], np.cumsum(sizes)))  # ends[i]: bytes of the first i kept samples
        first = 0
        while first < len(sizes):
            out = self.outputs[-1]
            budget = self.maxsize - TAR_END - out.payload
            fit = int(np.searchsorted(ends, ends[first] + budget, side="right")) - 1 - first
            take = min(fit, self.maxcount - out.count, len(sizes) - first)
            if out.count == 0:
                take = max(take, 1)  # a sample larger than maxsize still gets written, alone in its shard
            if take <= 0:
                self.outputs.append(OutputPlan(len(self.outputs)))
                continue
            end = first + take
            row_span = (0 if first == 0 else int(rows[first]), nrows if end == len(sizes) else int(rows[end]))
            self._segment(sid, key, row_span, (first, end), int(ends[first]), int(ends[end] - ends[first]))
            first = end

    def _segment(self, sid: str, key: str, rows: tuple[int, int], kept: tuple[int, int], offset: int,
                 length: int) -> None:
        out = self.outputs[-1]
        out.segments.append(Segment(sid, key, rows, kept, offset, length, out.count))
        out.count += kept[1] - kept[0]
        out.payload += length


def output_name(index: int, total: int) -> str:
    return f"{index:0{max(NAME_DIGITS, len(str(total - 1)))}d}"


def plan_outputs(config: CleanConfig, sids: list[str]) -> Plan:
    """The run's cleaned shards from every input shard's part index, in input order (read ahead on a bounded
    thread pool)."""
    cutter = _Cutter(config.out.maxcount, config.out.maxsize)
    for loaded in imap(lambda sid: _load(config, sid), sids):
        cutter.add(*loaded)
    outputs = cutter.outputs
    placed: dict[str, list[tuple[str, int, int, int]]] = {sid: [] for sid in sids}
    owned: dict[str, list[tuple[str, str]]] = {sid: [] for sid in sids}
    for out in outputs:
        out.name = output_name(out.index, len(outputs))
        out.key = digest(out.name, [(s.sid, s.key, s.rows, s.kept) for s in out.segments], package_version())
        owned[out.segments[0].sid].append((out.name, out.key))
        for s in out.segments:
            if s.kept[1] > s.kept[0]:
                placed[s.sid].append((out.name, s.position, *s.kept))
    return Plan(outputs, placed, owned, _missing_parts(config, outputs))


def is_current(config: CleanConfig, out: OutputPlan) -> bool:
    """The output shard and its stats exist and were made from this content (its stats record the key)."""
    stats = read_json(output_shard_path(config.output, out.name, "_stats.json"))
    return isinstance(stats, dict) and stats.get(resume.KEY) == out.key and \
        resume.exists(output_shard_path(config.output, out.name))


def _missing_parts(config: CleanConfig, outputs: list[OutputPlan]) -> list[str]:
    missing: set[str] = set()
    for out, current in zip(outputs, imap(lambda o: is_current(config, o), outputs)):
        if not current:
            missing.update(s.sid for s in out.segments
                           if s.length and not resume.exists(part_path(config.output, s.sid, ".tar")))
    return sorted(missing)
