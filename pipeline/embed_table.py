"""The embeddings Parquet's table: one row per input sample (errors included) with its embeddings as fixed-size
lists, and `sample_sha256`, the digest of the sample's members that later stages check the input against
(pipeline/content_id.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

# Rows per Parquet row group of an embeddings file: the fit reads only the row groups that hold its sampled rows
# (pipeline/fit_sample.py), so at 10^5 shards its 32,768 rows cost about 32,768 groups of this size, not ~28% of
# every file (the default, one group per shard)
EMBED_ROW_GROUP_ROWS = 1024
STORAGE_TYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
ROW_COLUMNS = ("key", "status", "reason", "detail", "caption", "width", "height", "url", "uid", "image_sha256",
               "sample_sha256")


def embed_table(rows: list[dict[str, Any]], image_emb: np.ndarray, text_emb: np.ndarray, shard: str,
                dims: tuple[int, int], dtype: str = "float16") -> pa.Table:
    """The shard's rows plus image_emb/text_emb stored as FixedSizeList(`dtype`) (config embed.dtype). A row
    without `sample_sha256` (a reader-level issue: no members) stores null there."""
    ok = np.array([r["status"] == "ok" for r in rows], dtype=bool)
    columns: dict[str, Any] = {"shard": [shard] * len(rows)}
    for name in ROW_COLUMNS:
        columns[name] = [r.get(name) for r in rows]
    table = pa.table(columns, schema=base_schema())
    value_type = STORAGE_TYPES[dtype][1]
    for name, emb, dim in (("image_emb", image_emb, dims[0]), ("text_emb", text_emb, dims[1])):
        table = table.append_column(pa.field(name, pa.list_(value_type, dim)), fixed_list(emb, ok, dim, dtype))
    return table


def base_schema() -> pa.Schema:
    return pa.schema([("shard", pa.string()), ("key", pa.string()), ("status", pa.string()),
                      ("reason", pa.string()), ("detail", pa.string()), ("caption", pa.string()),
                      ("width", pa.int32()), ("height", pa.int32()), ("url", pa.string()), ("uid", pa.string()),
                      ("image_sha256", pa.string()), ("sample_sha256", pa.string())])


def fixed_list(emb: np.ndarray, ok: np.ndarray, dim: int, dtype: str = "float16") -> pa.FixedSizeListArray:
    """Fixed-size list column with nulls on error rows (Polars reads it as Array(Float16 or Float32, dim)).
    float16 rounds each float32 value to nearest (numpy's cast), the same bytes on every machine."""
    np_type, value_type = STORAGE_TYPES[dtype]
    full = np.zeros((len(ok), dim), dtype=np_type)
    full[ok] = emb
    values = pa.array(full.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~ok))
