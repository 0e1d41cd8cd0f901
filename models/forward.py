"""Row-level forward paths shared by training and scoring: row identity and fixed-shape chunked evaluation.

Row identity is a hash of a row's bytes, so duplicate rows (the 5 captions' copies of one photo) are
recognised and evaluated once. Every forward pass used for scoring runs on fixed-shape, zero-padded chunks, so
a row's result never depends on which other rows share its chunk (kernels round differently with the shape).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch

CHUNK = 1024  # rows per fixed-shape forward chunk (scoring paths)


def row_hashes(x: np.ndarray) -> np.ndarray:
    """64-bit hash of each row's bytes: equal rows (e.g. the 5 captions' copies of one image) share a hash."""
    x = np.ascontiguousarray(x)
    return np.array(
        [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little", signed=True) for row in x],
        dtype=np.int64,
    )


def dense_ids(hashes: np.ndarray) -> np.ndarray:
    return np.unique(hashes, return_inverse=True)[1].astype(np.int64)


def unique_rows(hashes: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """First row of each distinct row hash (in hash order) and the inverse map, as tensors on `device`."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return torch.from_numpy(first).to(device), torch.from_numpy(inverse.astype(np.int64).reshape(-1)).to(device)


def _unique_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First row of each distinct row (by exact bytes, in hash order) and the inverse map; lets 30k pairs embed
    only their ~6k distinct images."""
    return unique_rows(row_hashes(np.ascontiguousarray(x.detach().cpu().numpy())), x.device)


@torch.no_grad()
def chunked(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    chunk: int = CHUNK,
    rows: torch.Tensor | None = None,
    dest: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply fn on fixed-size zero-padded chunks so every row sees the same kernel shapes in every call.

    `rows` picks (and orders) the rows of x to process, gathered a chunk at a time; `dest` says where each
    processed row's result goes in the output (default: in processing order). Neither makes a full-size copy:
    at 1M pairs every copy of a 512-d float32 table is 2 GB.
    """
    total = x.shape[0] if rows is None else rows.shape[0]
    if total == 0:
        return fn(x.new_zeros((chunk,) + tuple(x.shape[1:])))[:0]
    out: torch.Tensor | None = None  # filled in place: a list + cat would hold the whole output twice
    for start in range(0, total, chunk):
        part = x[start : start + chunk] if rows is None else x[rows[start : start + chunk]]
        n = part.shape[0]
        if n < chunk:
            part = torch.cat([part, part.new_zeros((chunk - n,) + tuple(part.shape[1:]))])
        result = fn(part)[:n]
        if out is None:
            out = result.new_empty((total,) + tuple(result.shape[1:]))
        if dest is None:
            out[start : start + n] = result
        else:
            out[dest[start : start + n]] = result
    return out


@torch.no_grad()
def embed_rows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    dedup: bool = True,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """fn over the distinct rows of x (chunked), expanded back to every row. `groups` = unique_rows of x's
    row hashes when the caller already has them (training: the frozen inputs never change), saving the hashing
    of every row on every call."""
    if not dedup:
        return chunked(fn, x)
    first, inverse = _unique_rows(x) if groups is None else groups
    if first.shape[0] == x.shape[0]:
        # No duplicates: distinct row u is row first[u], so its result goes straight there (same chunks, same
        # order as below, without the full-size gather of the results)
        return chunked(fn, x, rows=first, dest=first)
    return chunked(fn, x, rows=first)[inverse]
