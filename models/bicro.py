"""BiCro (Yang et al., CVPR 2023) on frozen embeddings: soft correspondence labels for image-text pairs.

Two matchers co-train; each epoch every network divides the training pairs with a 2-component mixture on its
per-pair loss, picks the most confident clean pairs as anchors and, in its own embedding space, measures how
consistent each pair's cross-modal similarities are with its nearest anchors (bidirectional similarity
consistency). Those soft labels set per-pair triplet margins for its PEER. See docs/bicro.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np
import torch

from bicro_clean.models.cotrain import (
    CHUNK,
    CoTrainer,
    Division,
    NegativeBank,
    PairData,
    TrainConfig,
    chunked,
    divide,
    embed_pairs,
    row_hashes,
    seeded,
)
from bicro_clean.models.losses import bank_mean_hinge
from bicro_clean.models.matcher import Matcher
from bicro_clean.models.mixture import Mixture, mixture_from_tensor, normalise_losses

logger = logging.getLogger(__name__)

OUTPUT_FLOAT = ("p_clean", "consistency", "r_i2t", "r_t2i", "soft_label", "match_score")
OUTPUT_INT = ("anchor_for_image", "anchor_for_text")
FORMAT_VERSION = 1

ANCHOR_INDEX_KINDS = ("auto", "flat", "ivf")
# Default anchor bank bound: 65,536 anchors are more than Flickr8k's whole clean set (so its evaluation is
# unchanged) and keep the checkpoint and the scoring indexes under ~600 MB whatever the crawl size.
ANCHOR_CAP = 65_536
# "auto" anchor search: exact below this many distinct rows (Flickr8k's banks stay exact: <= ~25k rows), IVF
# above, where exact search costs 2 x rows x d FLOP per query on the CPU (134 MFLOP per pair at the cap).
AUTO_IVF_MIN_ROWS = 32_768


@dataclass
class BiCroParams:
    seed: int = 0
    embed_dim: int = 512
    hidden_dim: int = 1024
    epochs: int = 8
    warmup_epochs: int = 1
    batch_size: int = 128
    lr: float = 2e-4
    alpha: float = 0.2
    soft_margin_base: float = 10.0
    warmup_keep_ratio: float = 0.3
    division: str = "bmm"
    clean_threshold: float = 0.5
    noisy_label_threshold: float = 0.5
    # anchor bank: the K most confident clean pairs (0 = the whole clean set). Bounded by default so an epoch's
    # anchor search costs the same per pair at 100k and at 10M pairs (fit time linear in pairs, docs/benchmarks.md)
    anchor_top_k: int = ANCHOR_CAP
    top_anchors: int = 1024  # the most confident anchors whose soft label is 1 (-1 = every anchor)
    weight_decay: float = 1e-4
    dropout: float = 0.0
    lr_schedule: str = "cosine"
    grad_clip: float = 2.0
    noisy_start: float = 0.5  # fraction of the co-training epochs after which noisy-set pairs join
    drop_zero_labels: bool = True  # noisy-set pairs whose label is 0 take no part in training
    center_consistency: bool = True  # intra-modal cosines for consistency measured after removing the mean
    train_consistency_floor: float = 0.2  # clean-set pairs (not top anchors) with consistency <= this sit out
    bank_size: int = 512
    mixture_iterations: int = 10
    threads: int = 2  # torch/faiss CPU threads in fit and score; fixed so float sums match across machines; 0 = inherit
    # Anchor search in training's consistency labels and in scoring: "flat" = exact, "ivf" = faiss IndexIVFFlat,
    # approximate but ~A / (nlist + nprobe * A / nlist) times less work (docs/benchmarks.md measures the cost);
    # "auto" = exact up to AUTO_IVF_MIN_ROWS distinct anchor rows (and always on CUDA), IVF above.
    anchor_index: str = "auto"
    ivf_nlist: int = 0  # inverted lists; 0 = about 2 * sqrt(distinct anchor rows)
    ivf_nprobe: int = 8  # lists visited per query

    def validate(self) -> None:
        if self.division not in ("bmm", "gmm"):
            raise ValueError(f"division must be 'bmm' or 'gmm', got {self.division!r}")
        if self.anchor_index not in ANCHOR_INDEX_KINDS:
            raise ValueError(f"anchor_index must be one of {ANCHOR_INDEX_KINDS}, got {self.anchor_index!r}")
        if self.ivf_nlist < 0 or self.ivf_nprobe < 1:
            raise ValueError("ivf_nlist must be >= 0 and ivf_nprobe >= 1")
        if self.warmup_epochs > self.epochs:
            raise ValueError("warmup_epochs must not exceed epochs")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (negatives come from the batch)")

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            dropout=self.dropout,
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            epochs=self.epochs,
            lr_schedule=self.lr_schedule,
            alpha=self.alpha,
            soft_margin_base=self.soft_margin_base,
            grad_clip=self.grad_clip,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "BiCroParams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    if n <= 0:
        yield
        return
    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        faiss.omp_set_num_threads(old_faiss)


# ------------------------------------------------------------------------------- consistency labels


def _ratio(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """min/max of two similarities; 0 when either is not positive (the ratio would be meaningless)."""
    ok = (u > 0) & (v > 0)
    r = torch.minimum(u, v) / torch.maximum(u, v).clamp(min=1e-12)
    return torch.where(ok, r, torch.zeros_like(r))


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


def _dot_with_rows(x: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    """(x[n] . bank[rows[n]]) for every n, a chunk of rows at a time: gathering bank[rows] whole would make two
    (N, d) temporaries (2 GB each at 1M pairs) just to take N dot products."""
    out = x.new_empty(x.shape[0])
    for start in range(0, x.shape[0], chunk):
        part = slice(start, start + chunk)
        out[part] = (x[part] * bank[rows[part]]).sum(dim=1)
    return out


def consistency_labels(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    anchor_img: torch.Tensor,
    anchor_txt: torch.Tensor,
    self_index: np.ndarray | torch.Tensor | None = None,
    indexes: tuple[AnchorIndex, AnchorIndex] | None = None,
    groups: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bidirectional cross-modal similarity consistency of each pair with its nearest anchors.

    Inputs are L2-normalised (N, d) and (A, d) tensors in one network's space; self_index[n] is pair n's row in
    the anchor bank or -1. i2t: a* = anchor whose image is nearest to image n, u = cos(I_n, I_a*),
    v = cos(T_n, T_a*), r_i2t = min(u, v) / max(u, v) (0 when u <= 0 or v <= 0). t2i: likewise with b* = anchor
    whose text is nearest to text n. consistency = (r_i2t + r_t2i) / 2.
    Returns (consistency, r_i2t, r_t2i, anchor_for_image, anchor_for_text); anchors are int64 bank indices.
    `indexes` (image, text) are prepared AnchorIndexes of the banks and `groups` the distinct image / text query
    rows (see nearest_anchor); scoring passes both, training builds them per call.
    """
    n = img_emb.shape[0]
    own = np.full(n, -1, dtype=np.int64) if self_index is None else np.asarray(torch.as_tensor(self_index).cpu())
    dev = img_emb.device
    idx_i, idx_t = indexes if indexes is not None else (None, None)
    grp_i, grp_t = groups if groups is not None else (None, None)
    a_img = nearest_anchor(img_emb, anchor_img, own, idx_i, grp_i, chunk)
    a_txt = nearest_anchor(txt_emb, anchor_txt, own, idx_t, grp_t, chunk)

    def ratio_with(anchor: np.ndarray) -> torch.Tensor:
        if n == 0:
            return torch.zeros(0, device=dev)
        valid = torch.from_numpy(anchor >= 0).to(dev)
        a = torch.from_numpy(np.maximum(anchor, 0)).to(dev)
        if anchor_img.shape[0] == 0:
            return torch.zeros(n, device=dev)
        u = _dot_with_rows(img_emb, anchor_img, a)
        v = _dot_with_rows(txt_emb, anchor_txt, a)
        return torch.where(valid, _ratio(u, v), torch.zeros_like(u))

    r_i2t, r_t2i = ratio_with(a_img), ratio_with(a_txt)
    return (r_i2t + r_t2i) / 2, r_i2t, r_t2i, torch.from_numpy(a_img), torch.from_numpy(a_txt)


def top_anchor_mask(bank_index: np.ndarray, top_anchors: int) -> np.ndarray:
    """Pairs whose label is fixed to 1: the first top_anchors rows of the (confidence-sorted) anchor bank."""
    if top_anchors < 0:
        return bank_index >= 0
    return (bank_index >= 0) & (bank_index < top_anchors)


def soft_labels(
    p_clean: np.ndarray, consistency: np.ndarray, is_anchor: np.ndarray, clean_threshold: float, tau: float
) -> np.ndarray:
    """Anchors 1; other clean-set pairs 0.5 + c/2; noisy-set pairs c, or 0 when c <= tau."""
    c = np.asarray(consistency, dtype=np.float64)
    clean = np.asarray(p_clean) > clean_threshold
    noisy_label = np.where(c > tau, c, 0.0)
    return np.where(clean, np.where(is_anchor, 1.0, 0.5 + c / 2.0), noisy_label)


def select_anchors(p_clean: np.ndarray, clean: np.ndarray, top_k: int) -> np.ndarray:
    """Clean pairs by decreasing p_clean (ties: lower index first), cut to top_k when top_k > 0."""
    idx = np.flatnonzero(clean)
    idx = idx[np.argsort(-p_clean[idx], kind="stable")]
    return idx[:top_k] if top_k > 0 else idx


def clean_set(p_clean: np.ndarray, threshold: float, min_fraction: float = 0.01) -> np.ndarray:
    """p_clean > threshold; if that leaves (almost) nothing, the min_fraction most confident pairs (as NCR does
    for the opposite case), so a degenerate mixture cannot starve a network of training data."""
    clean = p_clean > threshold
    need = max(2, int(math.ceil(min_fraction * len(p_clean))))
    if clean.sum() < need:
        clean = np.zeros(len(p_clean), dtype=bool)
        clean[np.argsort(-p_clean, kind="stable")[:need]] = True
    return clean


def consistency_space(emb: torch.Tensor, center: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
    """Embeddings as used for consistency: minus the space's mean direction, re-normalised.

    A triplet-trained space is a narrow cone: two unrelated captions have cosine ~0.5, so min/max ratios are
    high for every pair and tau = 0.5 separates nothing. Removing the mean puts unrelated items near 0.
    `inplace` overwrites `emb` (same arithmetic as F.normalize: x / max(|x|, 1e-12)) when the caller has no
    further use for it, saving a full-size copy.
    """
    if center is None:
        return emb
    if not inplace:
        return torch.nn.functional.normalize(emb - center, dim=-1)
    emb.sub_(center)
    return emb.div_(emb.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def space_center(emb: torch.Tensor, enabled: bool) -> torch.Tensor | None:
    return emb.mean(dim=0) if enabled else None


@dataclass
class EpochLabels:
    labels: np.ndarray  # (N,) soft label for every pair
    clean: np.ndarray  # (N,) bool: the divider's clean set
    consistency: np.ndarray
    train_clean: np.ndarray  # (N,) bool: the clean-set pairs the peer actually trains on


def labels_from_division(div: Division, params: BiCroParams, consume: bool = False) -> EpochLabels:
    """Everything one network hands its peer for an epoch: split, anchors and soft labels.

    `consume`: the division's embeddings may be overwritten (the caller drops them afterwards)."""
    clean = clean_set(div.p_clean, params.clean_threshold)
    anchors = select_anchors(div.p_clean, clean, params.anchor_top_k)
    own = np.full(len(clean), -1, dtype=np.int64)
    own[anchors] = np.arange(len(anchors))
    a = torch.from_numpy(anchors).to(div.img_emb.device)
    img = consistency_space(div.img_emb, space_center(div.img_emb, params.center_consistency), consume)
    txt = consistency_space(div.txt_emb, space_center(div.txt_emb, params.center_consistency), consume)
    # the run's anchor search ("auto": IVF once the bank is large; exact search over a large bank every epoch
    # would take hours at 1M pairs on a CPU)
    exact = "torch" if img.device.type == "cuda" else "faiss"
    indexes = tuple(AnchorIndex.build(x[a], params.anchor_index, params.ivf_nlist, params.ivf_nprobe, params.seed,
                                      exact) for x in (img, txt))
    c, *_ = consistency_labels(img, txt, img[a], txt[a], own, indexes)
    c_np = c.double().cpu().numpy()
    top = top_anchor_mask(own, params.top_anchors)
    labels = soft_labels(div.p_clean, c_np, top, params.clean_threshold, params.noisy_label_threshold)
    labels[clean & ~(div.p_clean > params.clean_threshold)] = 1.0  # forced clean set: trust it as anchors
    # A clean-set pair whose own neighbourhood contradicts it (consistency near 0) is most likely a noisy pair
    # with a small loss; training on it, even with a small margin, is how noisy pairs get memorised.
    train_clean = clean & ((c_np > params.train_consistency_floor) | top | ~(div.p_clean > params.clean_threshold))
    return EpochLabels(labels, clean, c_np, train_clean)


# ------------------------------------------------------------------------------------------- model


# Rows per fixed-shape scoring chunk. On the 2-core AVX2 machine MKL's sgemm ran at 17 GFLOP/s on 256-row
# chunks and 45 on 1,024 (512 -> 1,024 linear, same load), so smaller chunks would cost more than the padding of
# a short last chunk (faiss IndexFlatIP likewise: 2.1x slower on 256-query chunks than on 1,024).
SCORE_CHUNK_CPU = 1024
SCORE_CHUNK_CUDA = 2048


def _row_groups(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each distinct hash, each row's distinct id)."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return first.astype(np.int64), inverse.reshape(-1).astype(np.int64)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])


@dataclass
class ScoringState:
    """What every score() call reuses: each network's embedding of the negative bank, the bank's row hashes on
    the model's device, and the (image, text) anchor indexes. Built once per loaded model."""

    bank_emb: list[tuple[torch.Tensor, torch.Tensor]]
    bank_ih: torch.Tensor
    bank_th: torch.Tensor
    indexes: tuple[AnchorIndex, AnchorIndex] | None

    @classmethod
    def build(cls, model: "BiCroModel") -> "ScoringState":
        p, dev = model.params, model.device
        if dev.type == "cpu":
            # keep glibc from unmapping every MB-sized activation after use (page faults dominated small ops)
            from bicro_clean.models.encoders import tune_cpu_allocator

            tune_cpu_allocator()
        bank_emb = [embed_pairs(net, model.bank.image.to(dev), model.bank.text.to(dev)) for net in model.nets]
        indexes = None
        if model.anchor_img.shape[0] > 0:
            indexes = tuple(
                AnchorIndex.build(bank.to(dev), p.anchor_index, p.ivf_nlist, p.ivf_nprobe, p.seed,
                                  exact="torch" if dev.type == "cuda" else "faiss")
                for bank in (model.anchor_img, model.anchor_txt)
            )
        return cls(bank_emb, torch.from_numpy(model.bank.image_hash).to(dev),
                   torch.from_numpy(model.bank.text_hash).to(dev), indexes)



class BiCroModel:
    """Both networks plus everything needed to score pairs never seen in training, exactly as in training."""

    def __init__(
        self,
        params: BiCroParams,
        nets: list[Matcher],
        mixtures: list[Mixture],
        loss_ranges: list[tuple[float, float]],
        bank: NegativeBank,
        anchor_img: torch.Tensor,
        anchor_txt: torch.Tensor,
        anchor_keys: list[str],
        aligned: bool,
        device: str | torch.device = "cpu",
        centers: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.params = params
        self.centers = centers  # per network (image, text) mean used by consistency_space, or None
        self.nets = [net.eval() for net in nets]
        self.mixtures = mixtures
        self.loss_ranges = loss_ranges
        self.bank = bank
        self._state: ScoringState | None = None  # search indexes + bank embeddings, built on first score()
        self.anchor_img = anchor_img
        self.anchor_txt = anchor_txt
        self.anchor_keys = list(anchor_keys)
        self.aligned = aligned
        self.device = torch.device(device)

    # Replacing the anchor bank (finalise does, after construction) drops the prepared search state.
    @property
    def anchor_img(self) -> torch.Tensor:
        return self._anchor_img

    @anchor_img.setter
    def anchor_img(self, value: torch.Tensor) -> None:
        self._anchor_img, self._state = value, None

    @property
    def anchor_txt(self) -> torch.Tensor:
        return self._anchor_txt

    @anchor_txt.setter
    def anchor_txt(self, value: torch.Tensor) -> None:
        self._anchor_txt, self._state = value, None

    @property
    def anchor_keys(self) -> list[str]:
        return self._anchor_keys

    @anchor_keys.setter
    def anchor_keys(self, value: list[str]) -> None:
        self._anchor_keys = list(value)
        self._anchor_pos = {key: i for i, key in enumerate(self._anchor_keys)}

    # ---- scoring

    @property
    def score_chunk(self) -> int:
        """Rows per fixed-shape chunk when scoring (see SCORE_CHUNK_CPU); larger on a GPU (fewer launches)."""
        return SCORE_CHUNK_CUDA if self.device.type == "cuda" else SCORE_CHUNK_CPU

    def scoring_state(self) -> "ScoringState":
        """Anchor indexes and bank embeddings: built once per loaded model, not once per score() call."""
        if self._state is None:
            start = time.perf_counter()
            with torch.no_grad(), _threads(self.params.threads):
                self._state = ScoringState.build(self)
            logger.info("scoring state: %d anchors, %s index, %.1fs", len(self.anchor_keys),
                        self._state.indexes[0].kind if self._state.indexes else "-", time.perf_counter() - start)
        return self._state

    def consistency_embeddings(
        self, img_nets: list[torch.Tensor], txt_nets: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both networks' (centred) unit vectors side by side: cosines there are the mean of the two nets'."""
        if self.centers is not None:
            img_nets = [consistency_space(x, c[0]) for x, c in zip(img_nets, self.centers)]
            txt_nets = [consistency_space(x, c[1]) for x, c in zip(txt_nets, self.centers)]
        return ensemble(img_nets), ensemble(txt_nets)

    def _self_index(self, keys: list[str] | None, n: int) -> np.ndarray:
        if keys is None:
            return np.full(n, -1, dtype=np.int64)
        if len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} pairs")
        return np.array([self._anchor_pos.get(k, -1) for k in keys], dtype=np.int64)

    def _bank_losses(self, k: int, img: torch.Tensor, txt: torch.Tensor, ih: torch.Tensor,
                     th: torch.Tensor) -> np.ndarray:
        """models.cotrain.bank_losses with the bank embedded once (ScoringState) instead of on every call."""
        st, chunk = self.scoring_state(), self.score_chunk
        bank_img, bank_txt = st.bank_emb[k]
        out = []
        for start in range(0, img.shape[0], chunk):
            qi, qt = img[start : start + chunk], txt[start : start + chunk]
            hi, ht = ih[start : start + chunk], th[start : start + chunk]
            n = qi.shape[0]
            if n < chunk:  # same kernel shapes for every chunk
                qi, qt = _pad_rows(qi, chunk), _pad_rows(qt, chunk)
                hi, ht = _pad_rows(hi, chunk), _pad_rows(ht, chunk)
            pos = (qi * qt).sum(dim=1)
            valid = ((hi[:, None] != st.bank_ih[None, :]) & (ht[:, None] != st.bank_th[None, :])).float()
            out.append(bank_mean_hinge(pos, qi @ bank_txt.T, qt @ bank_img.T, self.params.alpha, valid)[:n])
        return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)

    def _score_block(self, image_np: np.ndarray, text_np: np.ndarray, own: np.ndarray) -> dict[str, np.ndarray]:
        st, chunk = self.scoring_state(), self.score_chunk
        # Raw rows hashed once: the hashes skip same-row bank negatives, and their groups let each distinct
        # image / caption go through the heads and the anchor search once (5 captions share one photo).
        ih, th = row_hashes(image_np), row_hashes(text_np)
        g_img, g_txt = _row_groups(ih), _row_groups(th)
        image = torch.from_numpy(image_np[g_img[0]]).to(self.device)
        text = torch.from_numpy(text_np[g_txt[0]]).to(self.device)
        inv_i = torch.from_numpy(g_img[1]).to(self.device)
        inv_t = torch.from_numpy(g_txt[1]).to(self.device)
        ih_t, th_t = torch.from_numpy(ih).to(self.device), torch.from_numpy(th).to(self.device)
        p_nets, img_u, txt_u, img_nets, txt_nets = [], [], [], [], []
        for k, (net, mix, (lo, hi)) in enumerate(zip(self.nets, self.mixtures, self.loss_ranges)):
            img_u.append(chunked(net.embed_images, image, chunk))
            txt_u.append(chunked(net.embed_texts, text, chunk))
            img_nets.append(img_u[-1][inv_i])
            txt_nets.append(txt_u[-1][inv_t])
            losses = self._bank_losses(k, img_nets[-1], txt_nets[-1], ih_t, th_t)
            p_nets.append(mix.posterior_clean(normalise_losses(losses, lo, hi)))
        both = torch.cat([torch.cat(img_nets, 1), torch.cat(txt_nets, 1)], 1)
        d = img_nets[0].shape[1]
        # mean of the two networks' cosines, on fixed-shape chunks
        match = chunked(lambda x: ((x[:, : 2 * d] * x[:, 2 * d :]).sum(1) / 2)[:, None], both, chunk)[:, 0]
        ens_img_u, ens_txt_u = self.consistency_embeddings(img_u, txt_u)
        # the anchor searches run once per distinct image / caption (the groups of the raw rows)
        c, r_i2t, r_t2i, a_i, a_t = consistency_labels(
            ens_img_u[inv_i], ens_txt_u[inv_t], self.anchor_img, self.anchor_txt, own, st.indexes, (g_img, g_txt),
            chunk,
        )
        c_np = c.double().cpu().numpy()
        top = top_anchor_mask(own, self.params.top_anchors)
        labels = [
            soft_labels(p, c_np, top, self.params.clean_threshold, self.params.noisy_label_threshold) for p in p_nets
        ]
        return {
            "p_clean": np.mean(p_nets, axis=0).astype(np.float32),
            "consistency": c_np.astype(np.float32),
            "r_i2t": r_i2t.cpu().numpy().astype(np.float32),
            "r_t2i": r_t2i.cpu().numpy().astype(np.float32),
            "soft_label": np.mean(labels, axis=0).astype(np.float32),
            "match_score": match.cpu().numpy().astype(np.float32),
            "anchor_for_image": a_i.numpy().astype(np.int64),
            "anchor_for_text": a_t.numpy().astype(np.int64),
        }

    def score(
        self, image_emb: np.ndarray, text_emb: np.ndarray, keys: list[str] | None = None, batch_size: int = 65536
    ) -> dict[str, np.ndarray]:
        """Per-pair outputs; a pair's scores depend only on the pair (and its key), never on the other pairs."""
        image_emb = np.ascontiguousarray(image_emb, dtype=np.float32)
        text_emb = np.ascontiguousarray(text_emb, dtype=np.float32)
        n = len(image_emb)
        if len(text_emb) != n:
            raise ValueError(f"{n} images but {len(text_emb)} texts")
        own = self._self_index(keys, n)
        chunk = self.score_chunk
        step = max(chunk, (batch_size // chunk) * chunk)
        parts = []
        with torch.no_grad(), _threads(self.params.threads):
            for s in range(0, n, step):
                parts.append(self._score_block(image_emb[s : s + step], text_emb[s : s + step], own[s : s + step]))
        if not parts:
            return {k: np.zeros(0, np.float32) for k in OUTPUT_FLOAT} | {k: np.zeros(0, np.int64) for k in OUTPUT_INT}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # ---- persistence

    def save(self, path: str | Path) -> None:
        """A directory with tensors.safetensors (plain tensors) and model.json (params, dims, keys)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for k, net in enumerate(self.nets):
            for name, t in net.state_dict().items():
                tensors[f"net{k}.{name}"] = t.detach().cpu().contiguous()
            tensors[f"mixture{k}"] = self.mixtures[k].to_tensor()
            tensors[f"loss_range{k}"] = torch.tensor(self.loss_ranges[k], dtype=torch.float64)
            if self.centers is not None:
                tensors[f"center{k}.image"] = self.centers[k][0].detach().cpu().contiguous()
                tensors[f"center{k}.text"] = self.centers[k][1].detach().cpu().contiguous()
        tensors["bank.image"] = self.bank.image.cpu().contiguous()
        tensors["bank.text"] = self.bank.text.cpu().contiguous()
        tensors["bank.image_hash"] = torch.from_numpy(self.bank.image_hash.copy())
        tensors["bank.text_hash"] = torch.from_numpy(self.bank.text_hash.copy())
        tensors["anchor.image"] = self.anchor_img.cpu().contiguous()
        tensors["anchor.text"] = self.anchor_txt.cpu().contiguous()
        save_file(tensors, str(path / "tensors.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "params": asdict(self.params),
            "aligned": self.aligned,
            "image_dim": int(self.bank.image.shape[1]),
            "text_dim": int(self.bank.text.shape[1]),
            "anchor_keys": self.anchor_keys,
        }
        (path / "model.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "BiCroModel":
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "model.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format_version')}")
        params = BiCroParams.from_dict(meta["params"])
        tensors = load_file(str(path / "tensors.safetensors"), device="cpu")
        nets, mixtures, ranges = [], [], []
        for k in range(2):
            net = Matcher(
                meta["image_dim"], meta["text_dim"], params.embed_dim, params.hidden_dim, params.dropout, False
            )
            prefix = f"net{k}."
            net.load_state_dict({n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)})
            nets.append(net.to(device))
            mixtures.append(mixture_from_tensor(params.division, tensors[f"mixture{k}"]))
            lo, hi = tensors[f"loss_range{k}"].tolist()
            ranges.append((lo, hi))
        centers = None
        if "center0.image" in tensors:
            centers = [
                (tensors[f"center{k}.image"].to(device), tensors[f"center{k}.text"].to(device)) for k in range(2)
            ]
        bank = NegativeBank(
            tensors["bank.image"].to(device),
            tensors["bank.text"].to(device),
            tensors["bank.image_hash"].numpy(),
            tensors["bank.text_hash"].numpy(),
        )
        return cls(
            params,
            nets,
            mixtures,
            ranges,
            bank,
            tensors["anchor.image"].to(device),
            tensors["anchor.text"].to(device),
            meta["anchor_keys"],
            meta["aligned"],
            device,
            centers,
        )


def ensemble(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the networks' unit vectors, scaled so cosines in the result are the mean of theirs."""
    return torch.cat(parts, dim=1) / math.sqrt(len(parts))


# --------------------------------------------------------------------------------------------- fit


def _log_epoch(epoch: int, params: BiCroParams, info: dict, t0: float) -> None:
    logger.info("bicro epoch %d/%d %s (%.0fs)", epoch + 1, params.epochs, info, time.time() - t0)


def fit_bicro(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    params: BiCroParams,
    keys: list[str] | None = None,
    aligned: bool = False,
    device: str = "cpu",
    log_every: int = 1,
) -> tuple[BiCroModel, dict[str, np.ndarray]]:
    """Train BiCro on frozen pair embeddings; returns the model and its outputs for the training pairs.

    keys default to the row numbers as strings (they identify anchors for self-exclusion in score()).
    """
    params.validate()
    n = len(image_emb)
    keys = [str(i) for i in range(n)] if keys is None else list(keys)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} pairs")
    if len(set(keys)) != n:
        raise ValueError("keys must be unique")
    t0 = time.time()
    with seeded(params.seed, device), _threads(params.threads):
        data = PairData.build(image_emb, text_emb, device)
        bank = NegativeBank.sample(data, params.bank_size, params.seed)
        trainer = CoTrainer(data, params.train_config(), params.seed, aligned, device)
        run_cotraining(trainer, data, bank, params, log_every, t0)
        model = finalise(trainer, data, bank, params, keys, aligned, device)
    outputs = model.score(image_emb, text_emb, keys)
    logger.info("bicro fit done in %.0fs: %d anchors", time.time() - t0, len(model.anchor_keys))
    return model, outputs


def noisy_start_epoch(params: BiCroParams) -> int:
    return params.warmup_epochs + int(params.noisy_start * (params.epochs - params.warmup_epochs))


def run_cotraining(
    trainer: CoTrainer,
    data: PairData,
    bank: NegativeBank,
    params: BiCroParams,
    log_every: int,
    t0: float,
    monitor: Callable[[int, CoTrainer, list[Division] | None, list[EpochLabels] | None], None] | None = None,
    keep_embeddings: bool = False,
) -> None:
    """The co-training loop. ``monitor`` (development only) sees each epoch's divisions and labels; the divisions
    keep their pair embeddings only with ``keep_embeddings`` (4 GB per division at 1M pairs)."""
    dev = trainer.device
    for epoch in range(params.epochs):
        trainer.set_epoch(epoch)
        if epoch < params.warmup_epochs:
            losses = [trainer.warmup_epoch(k, params.warmup_keep_ratio) for k in range(2)]
            if log_every and (epoch + 1) % log_every == 0:
                _log_epoch(epoch, params, {"warmup_loss": [round(x, 4) for x in losses]}, t0)
            if monitor is not None:
                monitor(epoch, trainer, None, None)
            continue
        divs, labs = divide_and_label(trainer, data, bank, params, keep_embeddings=keep_embeddings)
        with_noisy = epoch >= noisy_start_epoch(params)
        info: dict = {}
        for k in range(2):
            lab = labs[k]
            clean_idx = np.flatnonzero(lab.train_clean)
            noisy_idx = np.flatnonzero(~lab.clean)
            if params.drop_zero_labels:
                noisy_idx = noisy_idx[lab.labels[noisy_idx] > 0]
            ct = torch.from_numpy(clean_idx).to(dev)
            nt = torch.from_numpy(noisy_idx).to(dev) if with_noisy else None
            labels_t = torch.from_numpy(lab.labels.astype(np.float32)).to(dev)
            loss = trainer.train_epoch(
                k, ct, labels_t[ct], nt, labels_t[nt] if nt is not None else None
            )
            info[f"net{k}"] = {
                "loss": round(loss, 4),
                "clean": int(lab.clean.sum()),
                "trained": int(lab.train_clean.sum()),
                "noisy_used": int(len(noisy_idx)) if with_noisy else 0,
                "noisy_w": round(divs[1 - k].mixture.noisy_weight(), 3),
            }
        if log_every and (epoch + 1) % log_every == 0:
            _log_epoch(epoch, params, info, t0)
        if monitor is not None:
            monitor(epoch, trainer, divs, labs)


def divide_and_label(
    trainer: CoTrainer, data: PairData, bank: NegativeBank, params: BiCroParams, keep_embeddings: bool = False
) -> tuple[list[Division], list[EpochLabels]]:
    """Each network's division and the labels it gives its peer (co-teaching: labs[k] comes from net 1 - k).

    One division at a time, its embeddings dropped once its labels exist (unless `keep_embeddings`): at 1M
    pairs each division holds 4 GB, and the consistency space makes centred copies of it.
    """
    divs: list[Division] = []
    labs: list[EpochLabels | None] = [None, None]
    for j in range(2):
        div = _divide(trainer.nets[j], data, bank, params)
        labs[1 - j] = labels_from_division(div, params, consume=not keep_embeddings)
        if not keep_embeddings:  # new empty tensors, not [:0] views, which would keep the storage alive
            div = replace(div, img_emb=div.img_emb.new_zeros((0,)), txt_emb=div.txt_emb.new_zeros((0,)))
        divs.append(div)
    return divs, [lab for lab in labs if lab is not None]


def _divide(net: Matcher, data: PairData, bank: NegativeBank, params: BiCroParams) -> Division:
    return divide(net, data, bank, params.alpha, params.division, params.mixture_iterations, params.seed)


def finalise(
    trainer: CoTrainer,
    data: PairData,
    bank: NegativeBank,
    params: BiCroParams,
    keys: list[str],
    aligned: bool,
    device: str,
) -> BiCroModel:
    """Final divisions of both networks; anchors = the most confident pairs of their consensus clean set."""
    divs = [_divide(net, data, bank, params) for net in trainer.nets]
    p_mean = np.mean([d.p_clean for d in divs], axis=0)
    anchors = select_anchors(p_mean, clean_set(p_mean, params.clean_threshold), params.anchor_top_k)
    centers = None
    if params.center_consistency:
        centers = [(d.img_emb.mean(dim=0), d.txt_emb.mean(dim=0)) for d in divs]
    model = BiCroModel(
        params,
        trainer.nets,
        [d.mixture for d in divs],
        [(d.loss_min, d.loss_max) for d in divs],
        bank,
        torch.zeros(0),
        torch.zeros(0),
        [keys[i] for i in anchors],
        aligned,
        device,
        centers,
    )
    a = torch.from_numpy(anchors).to(data.image.device)
    anchor_img, anchor_txt = model.consistency_embeddings([d.img_emb[a] for d in divs], [d.txt_emb[a] for d in divs])
    model.anchor_img, model.anchor_txt = anchor_img.contiguous(), anchor_txt.contiguous()
    return model
