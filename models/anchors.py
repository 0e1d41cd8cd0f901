"""Anchor search: each query's nearest anchor in the bank, never the query's own row.

`AnchorIndex` holds one modality's anchor bank ready to search (exact faiss or torch search, or faiss IVF for
large banks); `nearest_anchor` answers a batch of queries with it. Every search runs on fixed-size, zero-padded
query chunks, so a query's answer never depends on which other queries share its call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import faiss
import numpy as np
import torch

from bicro_clean.models.forward import CHUNK, row_hashes
from bicro_clean.models.params import AnchorIndexKind

ANCHOR_INDEX_KINDS: tuple[str, ...] = get_args(AnchorIndexKind)  # ("auto", "flat", "ivf")
# "auto" anchor search: exact below this many distinct rows (Flickr8k's banks stay exact: <= ~25k rows), IVF
# above, where exact search costs 2 x rows x d FLOP per query on the CPU (134 MFLOP per pair at the cap).
AUTO_IVF_MIN_ROWS = 32_768


def _two_reps(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct bank rows: (first index, second index or -1) per distinct row, and each row's distinct id."""
    uniq, inverse = np.unique(hashes, return_inverse=True)
    order = np.lexsort((np.arange(len(hashes)), inverse))  # by distinct id, then by bank index
    grouped = inverse[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    rep1 = order[starts]
    nxt = starts + 1
    has2 = (nxt < len(order)) & (np.r_[grouped, -1][np.minimum(nxt, len(order))] == grouped[starts])
    rep2 = np.where(has2, order[np.minimum(nxt, len(order) - 1)], -1)
    return rep1, rep2, inverse


IVF_TRAIN_ITERATIONS = 10
IVF_POINTS_PER_LIST = 40  # k-means sample per list: faiss warns below 39; more only makes the build slower


def _padded(part: np.ndarray, chunk: int) -> np.ndarray:
    """Queries zero-padded to `chunk` rows: every search call then has the same shape (faiss switches between a
    BLAS and a sequential kernel with the number of queries, and the two round differently)."""
    if len(part) < chunk:
        part = np.concatenate([part, np.zeros((chunk - len(part), part.shape[1]), dtype=np.float32)])
    return np.ascontiguousarray(part, dtype=np.float32)


def _search(index: faiss.Index, queries: np.ndarray, k: int, chunk: int = CHUNK) -> np.ndarray:
    """faiss search on fixed-size zero-padded chunks, so a query's answer never depends on the others."""
    out = []
    for start in range(0, len(queries), chunk):
        part = queries[start : start + chunk]
        _, ids = index.search(_padded(part, chunk), k)
        out.append(ids[: len(part)])
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def _torch_search(rows: torch.Tensor, queries: torch.Tensor, k: int, chunk: int) -> np.ndarray:
    """Exact inner-product top-k with torch on fixed-size zero-padded chunks (also the CUDA path: no faiss-gpu)."""
    out = []
    for start in range(0, queries.shape[0], chunk):
        part = queries[start : start + chunk]
        n = part.shape[0]
        if n < chunk:
            part = torch.cat([part, part.new_zeros((chunk - n, part.shape[1]))])
        out.append(torch.topk(part @ rows.T, k, dim=1).indices[:n].cpu())
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros((0, k), dtype=np.int64)


def auto_nlist(rows: int) -> int:
    """IVF list count: ~2 sqrt(rows), with >= 39 training rows per list (faiss k-means warns below that).

    Search work per query is nlist + nprobe * rows / nlist vectors; 4 sqrt(rows) lists cost less per query, but
    with 64 k-means rows per list both modalities' indexes took 69 s to build at 100k anchors on the 2 shared dev
    cores; 2 sqrt(rows) with 40 rows per list took 31 s there (10.5 s on a 16-core Xeon)."""
    return max(1, min(int(round(2 * math.sqrt(rows))), rows // 39))


def use_ivf(kind: str, rows: int, exact: str = "faiss") -> bool:
    """Whether an anchor bank of `rows` distinct rows is searched with IVF under `anchor_index` = kind."""
    if kind == "auto":  # torch exact search on a GPU beat CPU faiss IVF at 100k anchors (docs/benchmarks.md)
        return exact != "torch" and rows > AUTO_IVF_MIN_ROWS
    return kind == "ivf"


def _ivf_index(rows: np.ndarray, nlist: int, nprobe: int, seed: int) -> faiss.Index:
    """faiss IndexIVFFlat on unit rows; k-means with a fixed seed, so the same bank gives the same index."""
    d = rows.shape[1]
    nlist = min(nlist or auto_nlist(len(rows)), len(rows))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.spherical = True  # unit-norm centroids: inner-product assignment, as the search uses
    index.cp.max_points_per_centroid = IVF_POINTS_PER_LIST
    index.cp.niter = IVF_TRAIN_ITERATIONS
    index.train(rows)
    index.add(rows)
    index.nprobe = min(nprobe, nlist)
    return index


@dataclass
class AnchorIndex:
    """One modality's anchor bank ready to search: its distinct rows and a search structure over them.

    Exact duplicate bank rows (one photo, several anchor captions) are indexed once; rep1/rep2 give the first two
    bank indices of each distinct row, so a query can fall back to the duplicate when the first is itself.
    Built once per loaded model (BiCroModel.anchor_indexes), not once per score() call.
    """

    rep1: np.ndarray  # (R,) first bank index of each distinct row
    rep2: np.ndarray  # (R,) second bank index or -1
    k: int  # neighbours fetched per query (2: the nearest may be the query itself)
    index: faiss.Index | None = None  # faiss search (IVF; exact IndexFlatIP in training)
    rows: torch.Tensor | None = None  # distinct rows for exact search with torch matmul + topk
    kind: str = "flat"

    @classmethod
    def build(cls, bank: torch.Tensor, kind: str = "flat", nlist: int = 0, nprobe: int = 16, seed: int = 0,
              exact: str = "faiss") -> "AnchorIndex":
        """`exact` picks the flat backend: "faiss" IndexFlatIP (CPU) or "torch" matmul + topk (scoring on CUDA,
        where there is no faiss-gpu; on the 2-core CPU faiss on 1,024-query chunks was 2.7x faster than torch)."""
        bank_np = np.ascontiguousarray(bank.detach().float().cpu().numpy())
        rep1, rep2, _ = _two_reps(row_hashes(bank_np))
        distinct = np.ascontiguousarray(bank_np[rep1])
        k = min(2, len(rep1))
        # IVF needs enough rows to train lists; below a few lists' worth exact search is cheap anyway
        if use_ivf(kind, len(distinct), exact) and len(distinct) >= 4 * 39:
            return cls(rep1, rep2, k, index=_ivf_index(distinct, nlist, nprobe, seed), kind="ivf")
        if exact == "torch":
            return cls(rep1, rep2, k, rows=bank[torch.from_numpy(rep1).to(bank.device)].float().contiguous())
        index = faiss.IndexFlatIP(distinct.shape[1])
        index.add(distinct)
        return cls(rep1, rep2, k, index=index)

    def search(self, queries: torch.Tensor, chunk: int = CHUNK) -> np.ndarray:
        """(n, k) distinct-row ids of each query's nearest rows; chunked, so independent of the other queries."""
        if self.rows is not None:
            return _torch_search(self.rows, queries.float().to(self.rows.device), self.k, chunk)
        q_np = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        return _search(self.index, q_np, self.k, chunk)

    def best(self, hits: np.ndarray, self_index: np.ndarray) -> np.ndarray:
        """Bank index of each query's nearest anchor that is not the query's own row (-1 if none)."""
        best = np.full(len(hits), -1, dtype=np.int64)
        for j in range(hits.shape[1]):
            for cand in (self.rep1[hits[:, j]], self.rep2[hits[:, j]]):
                take = (best < 0) & (cand >= 0) & (cand != self_index)
                best[take] = cand[take]
        return best


def nearest_anchor(
    queries: torch.Tensor,
    bank: torch.Tensor,
    self_index: np.ndarray,
    index: AnchorIndex | None = None,
    groups: tuple[np.ndarray, np.ndarray] | None = None,
    chunk: int = CHUNK,
) -> np.ndarray:
    """Index of the bank row with the highest inner product, never the query's own row (-1 if none left).

    Exact duplicate bank rows (one photo, several anchor captions) are searched once; ties between them go to
    the lowest bank index, and duplicate queries are searched once. That keeps 30k x 25k searches cheap.
    `index` is a prepared AnchorIndex of `bank` (built here when None); `groups` = (first row, inverse) of the
    distinct queries when the caller already knows them (scoring knows them from the raw input rows).
    """
    n = queries.shape[0]
    if bank.shape[0] == 0 or n == 0:
        return np.full(n, -1, dtype=np.int64)
    if index is None:  # exact search; on a GPU with torch (faiss there would be CPU search over the bank)
        index = AnchorIndex.build(bank, exact="torch" if bank.device.type == "cuda" else "faiss")
    if groups is None:
        q_np = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        _, q_first, q_inv = np.unique(row_hashes(q_np), return_index=True, return_inverse=True)
    else:
        q_first, q_inv = groups
    first = torch.from_numpy(np.asarray(q_first, dtype=np.int64)).to(queries.device)
    hits = index.search(queries[first], chunk)[np.asarray(q_inv).reshape(-1)]  # (n, k) distinct-row ids
    return index.best(hits, self_index)
