"""Pack step: the write stage's parts -> `shards/NNNNN.tar` numbered over the run, sizes.json, annotated/, filtered/.

After every shard's write, `pack_stage` runs three steps on the run's executor:

    plan    one task: the cut, from the parts' indexes (pipeline/pack_plan.py)
    pack    mapped over groups of output shards: each tar is its segments' byte ranges copied from the parts
            (whole member blocks, byte for byte), then the end-of-archive blocks; `NNNNN_stats.json` beside it
            (img2dataset's per-shard stats, recording the key of the shard's content) is written last
    place   mapped over the write's groups of input shards: annotated/ and filtered/ with each kept row's
            `output_shard` and `output_index`, then the shard's completion marker results/<shard_id>.json; the
            part's tar and table are removed (its index stays, for planning again)

then writes `shards/sizes.json` ({"00000.tar": samples, ...}, as open_clip's `get_dataset_size` reads it).

Each step skips finished work by its key: an output shard whose stats record its content key, an input shard
whose marker records its placement. A rerun with the same configuration therefore rewrites nothing, and a killed
run gives the same bytes: the plan is a function of the parts, and every file is written atomically. When the cut
changed (an input shard changed, or the run has fewer inputs) an output shard may need the bytes of an input
shard whose part an earlier run packed and removed: that shard is written again first.
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from bicro_clean.pipeline import resume, select
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.layout import (
    SHARDS_DIR,
    SIZES,
    annotated_path,
    filtered_path,
    output_shard_path,
    part_path,
    result_path,
)
from bicro_clean.pipeline.pack_plan import OutputPlan, Plan, is_current, plan_outputs
from bicro_clean.pipeline.parquet_io import atomic_output, digest, join, read_columns, read_stage_metadata
from bicro_clean.pipeline.shard_groups import write_group
from bicro_clean.pipeline.shards import shard_id
from bicro_clean.pipeline.write import output_entry
from bicro_clean.pipeline.writers import (
    OutputShard,
    HashingSink,
    kept_rows,
    read_json,
    tar_end,
    write_annotated,
    write_json_atomic,
)

logger = logging.getLogger(__name__)
COPY_CHUNK = 8 << 20
STATS_COLUMNS = ["shard", "key", "output_key", "decision", "reason"]


def plan_stage(config: CleanConfig, sids: list[str]) -> Plan:
    return plan_outputs(config, sids)


def _rows_path(config: CleanConfig, sid: str) -> str:
    """The shard's rows: its part's table while the part waits, else annotated/ (placed by an earlier run)."""
    draft = part_path(config.output, sid, ".parquet")
    return draft if resume.exists(draft) else annotated_path(config.output, sid)


def _copy_range(src: str, offset: int, length: int, sink: HashingSink) -> None:
    with fsspec.open(src, "rb") as fh:
        fh.seek(offset)
        while length:
            chunk = fh.read(min(COPY_CHUNK, length))
            if not chunk:
                raise OSError(f"{src} ends {length} bytes early")
            sink.write(chunk)
            length -= len(chunk)


def _stats(config: CleanConfig, out: OutputPlan, tables: dict[str, pa.Table]) -> tuple[OutputShard, list[str]]:
    """The output shard's img2dataset-style stats from its segments' rows (reasons, renamed keys), and the input
    shards (as given) those rows came from."""
    shard, inputs = OutputShard(out.name, output_shard_path(config.output, out.name), successes=out.count), []
    for seg in out.segments:
        if seg.sid not in tables:
            tables.clear()  # an output shard's last input shard is the next one's first: keep one table
            tables[seg.sid] = read_columns(_rows_path(config, seg.sid), STATS_COLUMNS)
        rows = tables[seg.sid].slice(seg.rows[0], seg.rows[1] - seg.rows[0]).to_pydict()
        inputs += rows["shard"][:1]
        shard.count += len(rows["key"])
        shard.status.update(rows["reason"])
        shard.renamed += [{"shard": s, "shard_id": seg.sid, "key": k, "output_key": n} for s, k, n, d in
                          zip(rows["shard"], rows["key"], rows["output_key"], rows["decision"])
                          if d == select.KEEP and k != n]
    return shard, list(dict.fromkeys(inputs))


def pack_output(config: CleanConfig, out: OutputPlan, tables: dict[str, pa.Table]) -> bool:
    """Write one output shard and its stats (stats last: they mark it done); False when it was already done."""
    if is_current(config, out):
        return False
    shard, inputs = _stats(config, out, tables)
    with atomic_output(shard.path) as tmp, fsspec.open(tmp, "wb") as fh:
        sink = HashingSink(fh)
        for seg in out.segments:
            if seg.length:
                _copy_range(part_path(config.output, seg.sid, ".tar"), seg.offset, seg.length, sink)
        sink.write(tar_end(out.payload))
    shard.sha256, shard.bytes = sink.sha.hexdigest(), sink.size
    write_json_atomic(output_shard_path(config.output, out.name, "_stats.json"),
                      {**shard.stats(inputs), resume.KEY: out.key})
    return True


def pack_group(outputs: list[OutputPlan], config: CleanConfig) -> int:
    """Write a group of output shards; how many were written (the others were done)."""
    tables: dict[str, pa.Table] = {}
    return sum(pack_output(config, out, tables) for out in outputs)


def _output_columns(table: pa.Table, placed: list[tuple[str, int, int, int]]) -> pa.Table:
    """`table` with each kept row's output shard ("00003.tar") and its index there."""
    kept = np.flatnonzero(np.asarray(table["decision"].to_pylist(), dtype=object) == select.KEEP)
    names: list[str | None] = [None] * table.num_rows
    index = np.full(table.num_rows, -1, np.int64)
    for name, position, first, end in placed:
        rows = kept[first:end]
        index[rows] = np.arange(position, position + len(rows))
        for row in rows:
            names[row] = f"{name}.tar"
    for column, values in (("output_shard", pa.array(names, pa.string())),
                           ("output_index", pa.array(index, pa.int64(), mask=index < 0))):
        table = table.set_column(table.schema.get_field_index(column), column, values)
    return table


def _remove_part(config: CleanConfig, sid: str) -> None:
    for suffix in (".tar", ".parquet", ".json"):  # the index stays
        path = part_path(config.output, sid, suffix)
        if resume.exists(path):
            fsspec.get_fs_token_paths(path)[0].rm(path)


def place_shard(config: CleanConfig, sid: str, placed: list[tuple[str, int, int, int]],
                owned: list[tuple[str, str]]) -> None:
    """annotated/, filtered/ and the completion marker of one input shard, once its output shards are written.
    Skipped when its marker records the same placement: its rows' places and the content of the output shards it
    lists (one it lists may be packed again when a later input shard changed)."""
    placement = digest(placed, owned)
    marker = result_path(config.output, sid)
    pending = read_json(part_path(config.output, sid, ".json"))
    if not isinstance(pending, dict):
        done = read_json(marker)
        if isinstance(done, dict) and done.get("placement") == placement and \
                resume.completed_result(marker, done[resume.KEY], config.output, "annotated"):
            return
        pending = done
    source = _rows_path(config, sid)
    meta = read_stage_metadata(source) or {}
    table = _output_columns(read_columns(source, None), placed)
    paths = [annotated_path(config.output, sid), filtered_path(config.output, sid)]
    write_annotated(table, *paths, meta)
    outputs = [output_entry(config, paths[0], "annotated", table.num_rows),
               output_entry(config, paths[1], "filtered", kept_rows(table).num_rows),
               # kept samples' rows and bytes: what a later run plans from without reading the input again
               output_entry(config, part_path(config.output, sid, ".index.parquet"), "part_index",
                            len(kept_rows(table)))]
    for name, _ in owned:  # each output shard listed once, by the input shard it starts with
        stats_path = output_shard_path(config.output, name, "_stats.json")
        stats = read_json(stats_path) or {}
        outputs.append(output_entry(config, output_shard_path(config.output, name), "tar", stats.get("successes"),
                                    stats.get("sha256")))
        outputs.append(output_entry(config, stats_path, "stats", stats.get("count")))
    result = {k: v for k, v in pending.items() if k != "part"}
    write_json_atomic(marker, {**result, "outputs": outputs, "placement": placement})
    _remove_part(config, sid)


def place_group(items: list[tuple[str, list[tuple[str, int, int, int]], list[tuple[str, str]]]],
                config: CleanConfig) -> int:
    for sid, placed, owned in items:
        place_shard(config, sid, placed, owned)
    return len(items)


def _write_again(executor: Any, config: CleanConfig, shards: list[str], missing: list[str],
                 run_wide: select.RunWide) -> None:
    """Input shards whose bytes an output shard needs again, but whose part was packed and removed."""
    logger.info("pack: %d input shard(s) written again: their samples move to other output shards", len(missing))
    redo = [s for s in shards if shard_id(s) in set(missing)]
    for sid in missing:
        fs, _, (path,) = fsspec.get_fs_token_paths(result_path(config.output, sid))
        if fs.exists(path):
            fs.rm(path)
    executor.map(write_group, executor.shard_batches(redo), config, run_wide)


def write_sizes(config: CleanConfig, outputs: list[OutputPlan]) -> str:
    path = join(config.output, SHARDS_DIR, SIZES)
    write_json_atomic(path, {f"{out.name}.tar": out.count for out in outputs})
    return path


def cleaned_shards(config: CleanConfig, names: list[str], samples: int, base: str | None = None) -> dict[str, Any]:
    """What a trainer is given: open_clip's `--train-data` brace range, the samples and sizes.json. `base`: the
    folder the paths start with (default: the output folder as given; "" for paths relative to it)."""
    base = config.output if base is None else base
    folder = join(base, SHARDS_DIR) if base else SHARDS_DIR
    brace = f"{{{names[0]}..{names[-1]}}}" if len(names) > 1 else names[0]
    return {"train_data": f"{folder}/{brace}.tar", "samples": samples, "sizes": f"{folder}/{SIZES}"}


def pack_stage(executor: Any, config: CleanConfig, shards: list[str], run_wide: select.RunWide) -> dict[str, Any]:
    """Plan, pack and place on `executor` (run.Executor); the run's `cleaned_shards` entry."""
    sids = [shard_id(s) for s in shards]
    plan = executor.call(plan_stage, config, sids)
    if plan.missing:
        _write_again(executor, config, shards, plan.missing, run_wide)
        plan = executor.call(plan_stage, config, sids)
    by_name = {out.name: out for out in plan.outputs}
    groups = executor.shard_batches([out.name for out in plan.outputs])
    written = executor.map(pack_group, [[by_name[n] for n in group] for group in groups], config)
    items = [(sid, plan.placed[sid], plan.owned[sid]) for sid in sids]
    by_sid = dict(zip(sids, items))
    executor.map(place_group, [[by_sid[shard_id(s)] for s in group] for group in executor.shard_batches(shards)],
                 config)
    write_sizes(config, plan.outputs)
    logger.info("pack: %d cleaned shards (%d written, %d reused)", len(plan.outputs), sum(written),
                len(plan.outputs) - sum(written))
    return cleaned_shards(config, [out.name for out in plan.outputs], sum(out.count for out in plan.outputs))


def read_sizes(output: str) -> dict[str, int] | None:
    sizes = read_json(join(output, SHARDS_DIR, SIZES))
    return sizes if isinstance(sizes, dict) else None


def relative_cleaned(config: CleanConfig) -> dict[str, Any] | None:
    """manifest.json's `cleaned_shards`, from sizes.json, with paths relative to the output folder."""
    sizes = read_sizes(config.output)
    if not sizes:
        return None
    return cleaned_shards(config, [name[:-len(".tar")] for name in sorted(sizes)], sum(sizes.values()), base="")

