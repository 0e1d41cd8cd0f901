"""Parts as the write stage leaves them, made from samples in memory, and the pack step run on them.

A test describes each input shard as its rows: `(members, "kept")` for a kept sample (its tar members) or
`(None, reason)` for a row the rule dropped or the reader could not use. `pack_parts` writes every shard's part
(tar, index, rows, marker) into an output folder and runs the pack step's plan and pack on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.layout import output_shard_path, part_path
from bicro_clean.pipeline.pack import pack_group
from bicro_clean.pipeline.pack_plan import Plan, plan_outputs
from bicro_clean.pipeline.parquet_io import write_parquet_atomic
from bicro_clean.pipeline.parts import PartWriter
from bicro_clean.pipeline.writers import write_json_atomic

Row = tuple[list[tuple[str, bytes]] | None, str]


def pack_config(out: Path, maxcount: int = 10, maxsize: int = 10**9) -> CleanConfig:
    return CleanConfig.model_validate({"input": "in", "output": str(out),
                                       "out": {"maxcount": maxcount, "maxsize": maxsize}})


def write_part(config: CleanConfig, sid: str, spec: str, rows: list[Row], key: str | None = None) -> None:
    """One input shard's part, as `write.write_stage` leaves it for the pack step; `key`: its write key."""
    writer = PartWriter(part_path(config.output, sid, ".tar"))
    for row, (members, _) in enumerate(rows):
        if members is not None:
            writer.add(row, members)
    writer.close(part_path(config.output, sid, ".index.parquet"), {"shard": spec})
    keys = [f"{sid}-{row}" for row in range(len(rows))]
    table = pa.table({"shard": [spec] * len(rows), "key": keys, "output_key": keys,
                      "decision": ["keep" if members is not None else "drop" for members, _ in rows],
                      "reason": [reason for _, reason in rows],
                      "output_shard": pa.nulls(len(rows), pa.string()),
                      "output_index": pa.nulls(len(rows), pa.int64())})
    write_parquet_atomic(table, part_path(config.output, sid, ".parquet"), {"shard": spec})
    write_json_atomic(part_path(config.output, sid, ".json"),
                      {"shard": spec, "shard_id": sid, "cache_key": key or f"key-{sid}", "counts": {"in": len(rows)},
                       "outputs": [], "renamed_keys": []})


def pack_parts(out: Path, inputs: list[list[Row]], maxcount: int = 10,
               maxsize: int = 10**9) -> tuple[Plan, list[dict[str, Any]]]:
    """Every input shard's part, then the plan and the pack: the plan and each output shard's stats, in order."""
    config = pack_config(out, maxcount, maxsize)
    sids = [f"in{i}" for i in range(len(inputs))]
    for i, (sid, rows) in enumerate(zip(sids, inputs)):
        write_part(config, sid, f"in/{i}.tar", rows)
    plan = plan_outputs(config, sids)
    pack_group(plan.outputs, config)
    stats = [json.loads(Path(output_shard_path(config.output, o.name, "_stats.json")).read_text())
             for o in plan.outputs]
    return plan, stats
