"""BiCro's consistency maths: bidirectional similarity consistency, soft labels, clean set and anchor choice.

Pure functions of embeddings and posteriors, shared by training (models/train.py, each epoch's labels) and
scoring (models/bicro.py): the same arithmetic gives a pair the same label in both. See docs/bicro.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bicro_clean.models.anchors import AnchorIndex, nearest_anchor
from bicro_clean.models.forward import CHUNK


def _ratio(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """min/max of two similarities; 0 when either is not positive (the ratio would be meaningless)."""
    ok = (u > 0) & (v > 0)
    r = torch.minimum(u, v) / torch.maximum(u, v).clamp(min=1e-12)
    return torch.where(ok, r, torch.zeros_like(r))


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
