"""Read-only views into a fitted BiCro model for reports: per-network normalised losses and mixture densities.

`normalised_losses` goes through exactly the pieces `BiCroModel.score` uses (each network's embeddings, the
bank losses against the stored negative bank, the training min-max range), so the histogram a report draws is
the very quantity the stored mixtures turn into p_clean.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from bicro_clean.models.cotrain import bank_losses, embed_pairs
from bicro_clean.models.forward import row_hashes
from bicro_clean.models.mixture import normalise_losses

logger = logging.getLogger(__name__)


def _as_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    # a copy: Arrow-backed arrays are read-only, which torch.from_numpy warns about
    return torch.from_numpy(np.array(x, dtype=np.float32, copy=True)).to(device)


@torch.no_grad()
def normalised_losses(model: Any, image_emb: np.ndarray, text_emb: np.ndarray) -> list[np.ndarray]:
    """One float64 array per network: each pair's bank loss, min-max normalised with the training range."""
    if len(image_emb) != len(text_emb):
        raise ValueError(f"{len(image_emb)} images but {len(text_emb)} texts")
    image, text = _as_tensor(image_emb, model.device), _as_tensor(text_emb, model.device)
    # hashes of the raw rows: the bank loss skips negatives that are the pair's own image or caption
    ih, th = row_hashes(image.cpu().numpy()), row_hashes(text.cpu().numpy())
    out = []
    for net, (lo, hi) in zip(model.nets, model.loss_ranges):
        img, txt = embed_pairs(net, image, text)
        losses = bank_losses(net, img, txt, ih, th, model.bank, model.params.alpha)
        out.append(np.asarray(normalise_losses(losses, lo, hi), dtype=np.float64))
    return out


def _beta_pdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    from scipy.special import betaln

    inside = (x > 0) & (x < 1)
    safe = np.where(inside, x, 0.5)
    log_pdf = (a - 1.0) * np.log(safe) + (b - 1.0) * np.log1p(-safe) - betaln(a, b)
    return np.where(inside, np.exp(log_pdf), 0.0)


def _gauss_pdf(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return np.exp(-0.5 * (x - mean) ** 2 / var) / math.sqrt(2.0 * math.pi * var)


def component_pdfs(mixture: Any, x: np.ndarray) -> np.ndarray:
    """(2, len(x)) unweighted component densities, for the Beta (bmm) and Gaussian (gmm) mixtures."""
    x = np.asarray(x, dtype=np.float64)
    if hasattr(mixture, "alphas"):
        return np.stack([_beta_pdf(x, float(a), float(b)) for a, b in zip(mixture.alphas, mixture.betas)])
    if hasattr(mixture, "variances"):
        return np.stack([_gauss_pdf(x, float(m), float(v)) for m, v in zip(mixture.means(), mixture.variances)])
    raise TypeError(f"unknown mixture type {type(mixture).__name__}")


def mixture_density(mixture: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clean_pdf, noisy_pdf) at x, each weighted by its mixing weight (they sum to the mixture density)."""
    pdfs = component_pdfs(mixture, x) * np.asarray(mixture.weights, dtype=np.float64)[:, None]
    clean = mixture.clean_component()
    return pdfs[clean], pdfs[1 - clean]


def noisy_weight(model: Any) -> float:
    """The mixtures' noisy-component weight averaged over the networks: BiCro's own noise-rate estimate."""
    return float(np.mean([m.noisy_weight() for m in model.mixtures]))
