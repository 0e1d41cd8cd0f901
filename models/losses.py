"""Triplet losses on a batch similarity matrix S (rows: images, columns: captions; S[i, i] is pair i).

Every function takes a boolean ``negatives`` mask: ``negatives[i, j]`` is True when image i and caption j may be
used as a negative pair. The diagonal is always excluded; the trainer also excludes pairs that share an image
(Flickr-style data has 5 captions per photo, so a "negative" caption of the same photo is a positive).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

def soft_margin(labels: torch.Tensor, alpha: float, base: float) -> torch.Tensor:
    """BiCro/NCR exponential soft margin: alpha * (base^y - 1) / (base - 1); y=1 gives alpha, y=0 gives 0."""
    return alpha * (torch.pow(torch.as_tensor(base, dtype=labels.dtype), labels) - 1.0) / (base - 1.0)


def default_negatives(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _costs(sims: torch.Tensor, margins: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge costs with each pair's OWN margin in both directions.

    cost_t[i, j]: image i against negative caption j, margin of pair i (whose positive is S[i, i]).
    cost_v[i, j]: caption j against negative image i, margin of pair j (whose positive is S[j, j]).
    The authors' code adds the margin vector along the wrong axis for the first term, i.e. uses the negative
    caption's margin; that lets a confident negative set the margin for a doubtful anchor.
    """
    diag = sims.diagonal()
    cost_t = (margins[:, None] + sims - diag[:, None]).clamp(min=0)
    cost_v = (margins[None, :] + sims - diag[None, :]).clamp(min=0)
    cost_t = cost_t.masked_fill(~negatives, 0.0)
    cost_v = cost_v.masked_fill(~negatives, 0.0)
    return cost_t, cost_v


def hardest_triplet(sims: torch.Tensor, margins: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """VSE++ per-pair loss: hardest negative caption for the image + hardest negative image for the caption."""
    cost_t, cost_v = _costs(sims, margins, negatives)
    return cost_t.max(dim=1).values + cost_v.max(dim=0).values


def mean_triplet(sims: torch.Tensor, margins: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Per-pair loss averaged over all valid negatives in both directions (warm-up and division)."""
    cost_t, cost_v = _costs(sims, margins, negatives)
    count_t = negatives.sum(dim=1).clamp(min=1)
    count_v = negatives.sum(dim=0).clamp(min=1)
    return cost_t.sum(dim=1) / count_t + cost_v.sum(dim=0) / count_v


def small_loss_mean(per_sample: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Mean of the keep_ratio smallest per-sample losses: noisy pairs have large losses early on."""
    k = max(1, int(round(keep_ratio * per_sample.numel())))
    if k >= per_sample.numel():
        return per_sample.mean()
    return torch.topk(per_sample, k, largest=False).values.mean()


def bank_mean_hinge(
    pos: torch.Tensor,
    img_vs_bank_txt: torch.Tensor,
    bank_img_vs_txt: torch.Tensor,
    alpha: float,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Mean hinge of each pair against a fixed bank of negatives (no batch: a pair's loss is its own business).

    pos: (N,) S(I_n, T_n); img_vs_bank_txt: (N, M) S(I_n, T_k); bank_img_vs_txt: (N, M) S(I_k, T_n);
    valid: (N, M) which bank entries are real negatives for pair n.
    """
    cost_t = (alpha + img_vs_bank_txt - pos[:, None]).clamp(min=0) * valid
    cost_v = (alpha + bank_img_vs_txt - pos[:, None]).clamp(min=0) * valid
    count = valid.sum(dim=1).clamp(min=1)
    return (cost_t.sum(dim=1) + cost_v.sum(dim=1)) / count
