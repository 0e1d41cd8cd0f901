"""The fit sample read as a sample: each embeddings file's footer, then only the row groups holding sampled rows.

The sample's positions (pipeline.fit.sample_positions) are drawn over the run's ok rows, so every file's ok
count is needed first. The embed stage records it in the file's metadata (`samples - errors`), which comes with
the Parquet footer together with the row-group sizes: one small read per file, on a thread pool. A file with no
sampled row is never opened again; a file with error rows has its (small) status column read to map ok positions
to rows; then only the row groups that hold sampled rows are read. The rows, their order and so the fitted model
are the same as reading every file whole.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bicro_clean.pipeline.parallel_io import imap, pmap
from bicro_clean.pipeline.parquet_io import METADATA_KEY, read_columns
from bicro_clean.pipeline.score import fixed_list_matrix, pair_key

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ["shard", "key", "image_emb", "text_emb"]


@dataclass(frozen=True)
class Footer:
    """What one embeddings file's footer says: the stage metadata, row-group sizes and the ok row count."""

    path: str
    meta: dict[str, Any]
    row_groups: tuple[int, ...]
    ok: int
    all_ok: bool  # no error rows: ok position == row number


def read_footer(path: str) -> Footer:
    with fsspec.open(path, "rb") as fh:
        footer = pq.ParquetFile(fh).metadata
    raw = (footer.metadata or {}).get(METADATA_KEY)
    meta = json.loads(raw) if raw else {}
    if not meta:
        raise FileNotFoundError(f"no embeddings at {path}: run the embed stage first")
    groups = tuple(footer.row_group(i).num_rows for i in range(footer.num_row_groups))
    samples, errors = meta.get("samples"), meta.get("errors")
    if isinstance(samples, int) and isinstance(errors, int) and samples == footer.num_rows:
        return Footer(path, meta, groups, samples - errors, errors == 0)
    # an older or foreign file without the recorded counts: count its ok rows
    ok = int(pc.sum(pc.equal(read_columns(path, ["status"])["status"], "ok")).as_py() or 0)
    return Footer(path, meta, groups, ok, ok == footer.num_rows)


def read_footers(paths: list[str]) -> list[Footer]:
    return pmap(read_footer, paths)


def _rows(footer: Footer, positions: np.ndarray) -> np.ndarray:
    """Row numbers of the file's ok rows at `positions` (positions among its ok rows, ascending)."""
    if footer.all_ok:
        return positions.astype(np.int64)
    status = read_columns(footer.path, ["status"])["status"]
    return np.flatnonzero(np.asarray(pc.equal(status, "ok").to_numpy(zero_copy_only=False), bool))[positions]


def file_pairs(footer: Footer, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image/text embeddings and run-wide keys of one file's sampled ok rows, in row order."""
    rows = _rows(footer, positions)
    starts = np.cumsum([0, *footer.row_groups])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group_of)
    with fsspec.open(footer.path, "rb") as fh:
        table = pq.ParquetFile(fh).read_row_groups(groups.tolist(), columns=PAIR_COLUMNS)
    read_before = np.cumsum([0, *[footer.row_groups[g] for g in groups]])  # rows of earlier groups read
    local = rows - starts[group_of] + read_before[np.searchsorted(groups, group_of)]
    picked = table.take(pa.array(local, type=pa.int64()))
    keys = [pair_key(s, k) for s, k in zip(picked["shard"].to_pylist(), picked["key"].to_pylist())]
    return fixed_list_matrix(picked["image_emb"]), fixed_list_matrix(picked["text_emb"]), keys


def read_sample(footers: list[Footer], positions: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    """`file_pairs` for every file with a sampled row, in file order (files without one are not opened)."""
    wanted = [(f, p) for f, p in zip(footers, positions) if len(p)]
    logger.info("fit: reading the sample from %d of %d embeddings files", len(wanted), len(footers))
    return list(imap(lambda item: file_pairs(*item), wanted))
