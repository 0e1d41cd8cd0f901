"""One input shard's kept samples as a part: what the write stage hands to the pack step (pipeline/pack.py).

The write stage cannot name the cleaned shard a sample goes to: shards are numbered over the whole run and cut at
`--maxcount` / `--maxsize`, so that depends on every earlier input shard's kept samples and their bytes. So a write
streams its kept samples into `shards/.parts/<shard_id>.tar` (a complete tar of them, in input order: readable
alone, and byte ranges of it are exactly the samples' member blocks) and records each kept sample's row and byte
size in `<shard_id>.index.parquet`. The pack step plans the whole run's cut from the indexes (per-shard arrays, one
at a time) and copies byte ranges of the parts into the numbered shards.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bicro_clean.pipeline.parquet_io import atomic_output, write_parquet_atomic
from bicro_clean.pipeline.writers import HashingSink, sample_blob, tar_end

logger = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([("row", pa.int64()), ("bytes", pa.int64())])


class PartWriter:
    """Writes one input shard's kept samples into `path` (temp file, renamed on `close`) and their index."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows: list[int] = []
        self.sizes: list[int] = []
        self.renamed: list[dict[str, str]] = []
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_output(path))
        self._sink = HashingSink(self._stack.enter_context(fsspec.open(tmp, "wb")))

    def add(self, row: int, members: list[tuple[str, bytes]]) -> int:
        """Append one kept sample (annotated row `row`); returns its index among the shard's kept samples. One
        write per sample keeps the hashing sink's per-call cost low."""
        blob = sample_blob(members)
        self._sink.write(blob)
        self.rows.append(row)
        self.sizes.append(len(blob))
        return len(self.rows) - 1

    def abort(self) -> None:
        """Drop the temp file (an exception in the caller must not publish a partial part)."""
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def close(self, index_path: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Finish the tar (end-of-archive blocks, so the part is a valid tar alone) and write the index; what the
        write's marker records of the part."""
        payload = self._sink.size
        self._sink.write(tar_end(payload))
        sha, size = self._sink.sha.hexdigest(), self._sink.size
        self._stack.close()  # closes the file and renames the temp file into place
        index = pa.table({"row": pa.array(self.rows, pa.int64()), "bytes": pa.array(self.sizes, pa.int64())},
                         schema=INDEX_SCHEMA)
        write_parquet_atomic(index, index_path, meta)
        return {"kept": len(self.rows), "payload": payload, "bytes": size, "sha256": sha}


def read_index(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, bytes) of a part's kept samples, as int64 arrays."""
    with fsspec.open(path, "rb") as fh:
        table = pq.read_table(fh, columns=["row", "bytes"])
    return (table["row"].to_numpy().astype(np.int64, copy=False),
            table["bytes"].to_numpy().astype(np.int64, copy=False))
