"""The manifest's per-shard part: `manifest_shards.parquet`, one row per input shard, streamed while finalize
reads the shards' completion markers.

manifest.json stays small whatever the crawl (the summary: config, checkpoint, cutoff, counts, renamed keys and
the run-wide outputs, this table among them with its SHA-256). Each row here: the input's `url`, `shard_id` and
`fingerprint`, `reading` (how far the reader got, as JSON: samples_read, samples_lost, damage) and `outputs`
(path, kind, count, sha256 of every file the shard's write made). At 10^5 shards a JSON manifest holding these
was ~100 MB built in memory; this table is written in batches of BATCH rows.

`read_manifest` gives readers the whole record in its older single-file shape (`inputs`, `outputs` lists), from
either layout.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from bicro_clean.pipeline.layout import MANIFEST
from bicro_clean.pipeline.parquet_io import atomic_output, join
from bicro_clean.pipeline.writers import read_json

logger = logging.getLogger(__name__)

SHARDS_TABLE = "manifest_shards.parquet"
BATCH = 1024
OUTPUT = pa.struct([("path", pa.string()), ("kind", pa.string()), ("count", pa.int64()), ("sha256", pa.string())])
SCHEMA = pa.schema([("url", pa.string()), ("shard_id", pa.string()), ("fingerprint", pa.string()),
                    ("reading", pa.string()), ("outputs", pa.list_(OUTPUT))])


class ShardTable:
    """Writes manifest_shards.parquet row by row (a context manager; the file appears whole or not at all)."""

    def __init__(self, output: str) -> None:
        self.path = join(output, SHARDS_TABLE)
        self.rows = 0
        self._pending: list[dict[str, Any]] = []

    def __enter__(self) -> "ShardTable":
        self._atomic = atomic_output(self.path)
        tmp = self._atomic.__enter__()
        self._file = fsspec.open(tmp, "wb").__enter__()
        self._writer = pq.ParquetWriter(self._file, SCHEMA, compression="zstd")
        return self

    def add(self, result: dict[str, Any]) -> None:
        self._pending.append({"url": result["shard"], "shard_id": result["shard_id"],
                              "fingerprint": result["fingerprint"],
                              "reading": json.dumps(result.get("reading", {}), sort_keys=True),
                              "outputs": [{k: o.get(k) for k in OUTPUT.names} for o in result["outputs"]]})
        if len(self._pending) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_pylist(self._pending, schema=SCHEMA))
            self.rows += len(self._pending)
            self._pending = []

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self._flush()
            self._writer.close()
            self._file.close()
        finally:
            self._atomic.__exit__(*exc)


def shard_rows(output: str) -> Iterator[dict[str, Any]]:
    """The table's rows as the manifest's older `inputs` entries and each shard's output entries."""
    with fsspec.open(join(output, SHARDS_TABLE), "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=BATCH):
            for row in batch.to_pylist():
                yield row


def with_shards(record: Any, output: str) -> Any:
    """A manifest record with `inputs` and `outputs` as one list each (shard outputs, then the run-wide ones), as
    a single-file manifest held them. A record that already holds `inputs` (an older run's) is returned as it is."""
    if not isinstance(record, dict) or "inputs" in record:
        return record
    inputs, outputs = [], []
    for row in shard_rows(output):
        inputs.append({"url": row["url"], "shard_id": row["shard_id"], "fingerprint": row["fingerprint"],
                       **json.loads(row["reading"] or "{}")})
        outputs += row["outputs"]
    return {**record, "inputs": inputs, "outputs": outputs + record.get("outputs", [])}


def summary_fields(output: str) -> dict[str, Any]:
    """What a run's summary takes from OUTPUT/manifest.json besides the counts: `keep_uids` (the file's path, or
    why it was not written) and `estimates` (pipeline.estimates)."""
    record = read_json(join(output, MANIFEST))
    record = record if isinstance(record, dict) else {}
    written = next((o for o in record.get("outputs", []) if o.get("kind") == "keep_uids"), None)
    keep_uids = join(output, written["path"]) if written else record.get("keep_uids")
    return {"keep_uids": keep_uids, "estimates": record.get("estimates")}


def read_manifest(output: str) -> dict[str, Any] | None:
    """OUTPUT/manifest.json with its per-shard part (`with_shards`); None when there is no manifest."""
    record = read_json(join(output, MANIFEST))
    return with_shards(record, output) if isinstance(record, dict) else None
