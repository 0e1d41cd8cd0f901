"""keep_uids.npy written from sorted runs: bounded memory at any number of kept rows.

The kept uids are read from keep_keys.parquet in batches, sorted in runs of RUN_ROWS (64 MB each) and spilled to
local scratch; a k-way merge then streams them into the .npy file block by block. Each merge round takes, from
every run's current block, the uids not above the smallest block end: all of those precede anything still
unread, so the round's output is final once sorted. Memory: one run while sorting, then BLOCK_ROWS per run.
The file is byte for byte what `np.save` of the whole sorted array writes (same version 1.0 header).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import BinaryIO, Iterator

import numpy as np

logger = logging.getLogger(__name__)

RUN_ROWS = 1 << 22  # uids sorted at once (64 MB)
BLOCK_ROWS = 1 << 15  # uids read at once from each run in the merge (512 KB)


def sort_words(words: np.ndarray) -> np.ndarray:
    """``u8,u8`` words in ascending (high, low) order."""
    return words[np.lexsort((words["f1"], words["f0"]))]


class SortedRuns:
    """Sorted runs of ``u8,u8`` words in a scratch folder (removed by `close`)."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.scratch = tempfile.mkdtemp(prefix="bicro-clean-uids-")
        self.runs: list[tuple[str, int]] = []
        self.pending: list[np.ndarray] = []
        self.held = 0
        self.total = 0

    def add(self, words: np.ndarray) -> None:
        self.pending.append(words)
        self.held += len(words)
        self.total += len(words)
        if self.held >= RUN_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.held:
            return
        run = sort_words(np.concatenate(self.pending))
        self.pending, self.held = [], 0
        path = os.path.join(self.scratch, f"run-{len(self.runs):06d}")
        run.tofile(path)
        self.runs.append((path, len(run)))

    def merged(self) -> Iterator[np.ndarray]:
        """The words of every run in sorted order, in blocks."""
        self._flush()
        yield from merge_runs(self.runs, self.dtype)

    def close(self) -> None:
        for path, _ in self.runs:
            os.remove(path)
        os.rmdir(self.scratch)


class _Cursor:
    def __init__(self, path: str, rows: int, dtype: np.dtype) -> None:
        self.path, self.rows, self.dtype, self.read = path, rows, dtype, 0
        self.block = np.zeros(0, dtype)

    def refill(self) -> None:
        if not len(self.block) and self.read < self.rows:
            count = min(BLOCK_ROWS, self.rows - self.read)
            self.block = np.fromfile(self.path, self.dtype, count=count, offset=self.read * self.dtype.itemsize)
            self.read += count


def _not_above(block: np.ndarray, high: np.uint64, low: np.uint64) -> int:
    """How many leading words of a sorted block are <= (high, low)."""
    return int(np.count_nonzero((block["f0"] < high) | ((block["f0"] == high) & (block["f1"] <= low))))


def merge_runs(runs: list[tuple[str, int]], dtype: np.dtype) -> Iterator[np.ndarray]:
    cursors = [_Cursor(path, rows, dtype) for path, rows in runs]
    while True:
        for cursor in cursors:
            cursor.refill()
        live = [c for c in cursors if len(c.block)]
        if not live:
            return
        if len(live) == 1:
            yield live[0].block
            live[0].block = live[0].block[:0]
            continue
        high, low = min((c.block[-1]["f0"], c.block[-1]["f1"]) for c in live)
        taken = []
        for cursor in live:
            n = _not_above(cursor.block, high, low)
            taken.append(cursor.block[:n])
            cursor.block = cursor.block[n:]
        yield sort_words(np.concatenate(taken))


def write_npy(fh: BinaryIO, dtype: np.dtype, rows: int, blocks: Iterator[np.ndarray]) -> None:
    """A 1-d .npy file of `rows` elements from blocks, with the header `np.save` would write."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows,)}
    np.lib.format.write_array_header_1_0(fh, header)
    written = 0
    for block in blocks:
        fh.write(np.ascontiguousarray(block).tobytes())
        written += len(block)
    if written != rows:
        raise RuntimeError(f"keep_uids: merged {written} uids, expected {rows}")
