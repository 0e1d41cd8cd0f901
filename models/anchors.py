"""Anchor search: each query's nearest anchor in the bank, never the query's own row.

`AnchorIndex` holds one modality's anchor bank ready to search (exact faiss or torch search, faiss IVF for
large banks, or "pca": candidates from a low-dimensional projection re-ranked exactly, which scoring and training
use by default on the CPU); `nearest_anchor` answers a batch of queries with it. Every search runs on fixed-size,
zero-padded query chunks, so a query's answer never depends on which other queries share its call.
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

ANCHOR_INDEX_KINDS: tuple[str, ...] = get_args(AnchorIndexKind)  # ("auto", "flat", "ivf", "pca")
# "auto" anchor search: exact below this many distinct rows (Flickr8k's banks stay exact: <= ~25k rows), IVF
# above, where exact search costs 2 x rows x d FLOP per query on the CPU (134 MFLOP per pair at the cap).
AUTO_IVF_MIN_ROWS = 32_768
# "pca" search ("auto"'s choice on the CPU, scoring and training, from AUTO_PCA_MIN_ROWS distinct rows up to
# AUTO_IVF_MIN_ROWS): the
# bank's top PCA_DIM principal directions (uncentred second moment) give each query PCA_CANDIDATES
# candidates, re-ranked by their exact inner product in the full space. On the Flickr8k reference (1,024-d joint
# space, 10,504 anchors) the re-ranked top-2 was the exact top-2 for 99.98 % (images) / 99.89 % (captions) of
# queries at 96 / 32 (99.99 % / 99.99 % at 128 / 32) and every keep/drop decision was the exact one; faiss at
# d = 128 ran 3x slower than at 96 on the 2-core dev machine. It only works where the bank has a dominant
# subspace: the top 96 directions held 71 % / 87 % of the Flickr8k banks' energy but 24 % of an isotropic
# synthetic bank's (lab.synthetic, 16,384 anchors), where only 13 % of the re-ranked anchors were the exact ones.
# So "auto" keeps exact search below PCA_MIN_ENERGY.
AUTO_PCA_MIN_ROWS = 2_048
PCA_DIM = 96
PCA_CANDIDATES = 32
PCA_MIN_ENERGY = 0.6
# From PCA_IVF_MIN_ROWS distinct rows the candidates come from an IVF index over the projected rows (nlist
# auto_nlist, PCA_IVF_NPROBE lists visited) instead of a flat scan of them: at 16,384 anchors in 96-d the flat scan
# is bound by writing and heap-scanning 16,384 scores per query, not by FLOPs; the IVF scan visits ~1/8 of the rows
# (2.6x less CPU for caption queries on the towers reference, top-2 recall of the candidates 0.997 vs 0.999) and
# the exact re-ranking keeps whatever is found exact. Below it the flat scan is cheap enough.
PCA_IVF_MIN_ROWS = 4_096
PCA_IVF_NPROBE = 32


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


def search_kind(kind: str, rows: int, dim: int, exact: str = "faiss", scoring: bool = False) -> str:
    """The search a bank of `rows` distinct `dim`-d rows gets: "flat" (exact), "ivf" or "pca".

    "auto" picks "pca" on the CPU (faiss exact backend), in scoring and in training's consistency labels alike
    (`scoring` is kept for callers; it no longer changes the choice), and only where it saves work: enough rows,
    and a space wider than the projection (AnchorIndex.build also needs PCA_MIN_ENERGY)."""
    if use_ivf(kind, rows, exact):
        return "ivf" if rows >= 4 * 39 else "flat"  # IVF needs enough rows to train lists
    wide = dim > 2 * PCA_DIM  # ("auto" also needs the projection to hold PCA_MIN_ENERGY: AnchorIndex.build)
    if kind == "pca":
        return "pca" if wide and rows > PCA_CANDIDATES else "flat"
    if kind == "auto" and exact == "faiss" and wide and rows >= AUTO_PCA_MIN_ROWS:
        return "pca"
    return "flat"


def _projection(rows: np.ndarray, dim: int) -> tuple[np.ndarray, float]:
    """(d, dim) float32: the top `dim` eigenvectors of the rows' uncentred second moment, so inner products of
    projected vectors keep as much of the bank's inner products as any `dim` directions can; and the share of the
    bank's energy they hold. float32 Gram matrix, float64 eigensolver on one thread: 0.5 s at d = 1,024, where
    MKL's 2-thread eigh took 22 s on the shared 2 cores (and one thread is one summation order everywhere)."""
    x = torch.from_numpy(rows)
    gram = (x.T @ x).double()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        values, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    finally:
        torch.set_num_threads(threads)
    share = float(values[-dim:].sum() / values.sum().clamp_min(1e-30))
    return np.ascontiguousarray(vectors[:, -dim:].flip(1).float().numpy()), share


def _rerank(full: faiss.IndexFlatIP, queries: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """Of each query's candidate rows, the k with the highest exact inner product (ties: candidate order).

    faiss computes each (query, candidate) product on its own (compute_distance_subset: no gathered copy of the
    rows; 10x faster than a torch gather + bmm at 1,024 x 32 x 1,024), so no query depends on another."""
    n, c = cand.shape
    ids = np.ascontiguousarray(np.maximum(cand, 0), dtype=np.int64)
    exact = np.empty((n, c), dtype=np.float32)
    full.compute_distance_subset(n, faiss.swig_ptr(queries), c, faiss.swig_ptr(exact), faiss.swig_ptr(ids))
    exact[cand < 0] = -np.inf  # -1: fewer rows than candidates
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand, order, axis=1)


def _pca_search(index: faiss.Index, proj: torch.Tensor, full: faiss.IndexFlatIP, queries: np.ndarray, k: int,
                candidates: int, chunk: int = CHUNK) -> np.ndarray:
    """Candidates from the projected index, re-ranked exactly; fixed-size zero-padded chunks throughout."""
    out = []
    for start in range(0, len(queries), chunk):
        part = queries[start : start + chunk]
        q = _padded(part, chunk)
        _, cand = index.search(np.ascontiguousarray((torch.from_numpy(q) @ proj).numpy()), candidates)
        out.append(_rerank(full, q[: len(part)], cand[: len(part)], k))
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, k), dtype=np.int64)


def _pca_candidate_index(projected: np.ndarray, seed: int) -> faiss.Index:
    """Candidate index over the projected rows: flat below PCA_IVF_MIN_ROWS, IVF from there (seeded spherical
    k-means: unit centroids, inner-product assignment; the projected rows themselves keep their norms)."""
    if len(projected) < PCA_IVF_MIN_ROWS:
        index = faiss.IndexFlatIP(projected.shape[1])
        index.add(projected)
        return index
    return _ivf_index(projected, 0, PCA_IVF_NPROBE, seed)


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
    proj: torch.Tensor | None = None  # "pca": (d, PCA_DIM) projection; `index` holds the projected rows
    full: faiss.IndexFlatIP | None = None  # "pca": the distinct rows for the exact re-ranking

    @classmethod
    def build(cls, bank: torch.Tensor, kind: str = "flat", nlist: int = 0, nprobe: int = 16, seed: int = 0,
              exact: str = "faiss", scoring: bool = False) -> "AnchorIndex":
        """`exact` picks the flat backend: "faiss" IndexFlatIP (CPU) or "torch" matmul + topk (scoring on CUDA,
        where there is no faiss-gpu; on the 2-core CPU faiss on 1,024-query chunks was 2.7x faster than torch).
        `scoring`: the index serves BiCroModel.score, where "auto" may pick the "pca" search (search_kind)."""
        bank_np = np.ascontiguousarray(bank.detach().float().cpu().numpy())
        rep1, rep2, _ = _two_reps(row_hashes(bank_np))
        distinct = np.ascontiguousarray(bank_np[rep1])
        k = min(2, len(rep1))
        chosen = search_kind(kind, len(distinct), distinct.shape[1], exact, scoring)
        if chosen == "ivf":
            return cls(rep1, rep2, k, index=_ivf_index(distinct, nlist, nprobe, seed), kind="ivf")
        proj, share = _projection(distinct, PCA_DIM) if chosen == "pca" else (None, 1.0)
        if chosen == "pca" and (kind == "pca" or share >= PCA_MIN_ENERGY):
            index = _pca_candidate_index(
                np.ascontiguousarray((torch.from_numpy(distinct) @ torch.from_numpy(proj)).numpy()), seed)
            full = faiss.IndexFlatIP(distinct.shape[1])
            full.add(distinct)
            return cls(rep1, rep2, k, index=index, kind="pca", proj=torch.from_numpy(proj), full=full)
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
        if self.proj is not None:
            return _pca_search(self.index, self.proj, self.full, q_np, self.k, PCA_CANDIDATES, chunk)
        return _search(self.index, q_np, self.k, chunk)

    def best(self, hits: np.ndarray, self_index: np.ndarray) -> np.ndarray:
        """Bank index of each query's nearest anchor that is not the query's own row (-1 if none)."""
        best = np.full(len(hits), -1, dtype=np.int64)
        for j in range(hits.shape[1]):
            found = hits[:, j] >= 0  # -1: an IVF search found fewer rows than asked for
            for cand in (self.rep1[hits[:, j]], self.rep2[hits[:, j]]):
                take = (best < 0) & found & (cand >= 0) & (cand != self_index)
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
