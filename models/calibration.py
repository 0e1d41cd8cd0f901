"""Calibrating clean_score on evidence from networks that never trained on the pair.

The networks of a fit have trained on the pairs they score: clean ones they memorised and noisy ones they
half-memorised look cleaner than the same kind of pair does to a network that never saw it, while the reference
(the pairs re-paired at random) is always new to them. A clean_score calibrated on such evidence over-states how
clean the kept pairs are, most on small crawls (docs/bicro.md#clean_score). Two ways around it, chosen by the fit:

- **cross-fitting** (the crawl is about the fit sample): K fold models, each trained on the other folds, score the
  pairs of their own fold and a re-pairing of them. The out-of-fold evidence calibrates a CleanScorer whose
  outputs are honest probabilities of those weaker models; the full model's log-odds (its ranking, which the fold
  models would only weaken) are then mapped onto those probabilities by a monotone logistic fit (Platt scaling with
  soft targets). The map keeps the ranking and, through its intercept, the mean: mean clean_score = the
  out-of-fold estimate of the clean share.
- **held-out pairs** (the crawl is much larger than the fit sample): pairs outside the sample are new to the full
  model, exactly like the pairs it will score, so the CleanScorer is fitted on them and their re-pairing directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.optimize import minimize

from bicro_clean.models.clean_score import CleanScorer

logger = logging.getLogger(__name__)

FOLD_STREAM = 0xF01D5  # seeds the fold assignment; no other draw uses it
# Below this many pairs per fold a fold model is too weak to say anything about the full model's pairs: fits that
# small keep the in-sample calibration (tests and toy crawls; a real crawl has thousands of pairs).
MIN_FOLD_PAIRS = 64
# A slope below this would turn the full model's ranking into a near-constant score.
MIN_SLOPE = 1e-3


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """(n,) fold of each pair: a seeded balanced assignment (sizes differ by at most one)."""
    return np.random.default_rng((seed, FOLD_STREAM)).permutation(n) % folds


def can_cross_fit(n: int, folds: int) -> bool:
    return folds >= 2 and n // folds >= MIN_FOLD_PAIRS


def _soft_cross_entropy(theta: np.ndarray, s: torch.Tensor, target: torch.Tensor) -> tuple[float, np.ndarray]:
    t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    z = t[0] * s + t[1]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, target)
    loss.backward()
    assert t.grad is not None
    return float(loss.detach()), t.grad.numpy().copy()


def platt_to_targets(log_odds: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(a, b) with sigmoid(a * log_odds + b) closest to the probabilities `target` in cross-entropy, a > 0.
    At the optimum the mean of the mapped scores equals the mean target (the intercept's gradient is their
    difference), so the map carries the target's estimate of the clean share over."""
    s = torch.from_numpy(np.asarray(log_odds, dtype=np.float64))
    p = torch.from_numpy(np.clip(np.asarray(target, dtype=np.float64), 0.0, 1.0))
    result = minimize(_soft_cross_entropy, np.array([1.0, 0.0]), args=(s, p), jac=True, method="L-BFGS-B",
                      bounds=[(MIN_SLOPE, None), (None, None)])
    if not result.success:
        logger.warning("clean_score calibration map: %s", result.message)
    return float(result.x[0]), float(result.x[1])


def mapped(scorer: CleanScorer, slope: float, intercept: float, clean_share: float) -> CleanScorer:
    """The scorer whose log-odds are slope * scorer's + intercept: same ranking, same checkpoint layout."""
    return replace(scorer, weights=scorer.weights * slope, bias=scorer.bias * slope + intercept,
                   clean_share=clean_share)


@dataclass
class OutOfFold:
    """Evidence of every fit pair from the fold model that did not train on it, and of a re-pairing of each fold
    scored by the same model."""

    observed: np.ndarray  # (N, F)
    reference: np.ndarray  # (N, F)

    def scorer(self) -> CleanScorer:
        return CleanScorer.fit(self.observed, self.reference)


def cross_fitted(full: CleanScorer, full_evidence: np.ndarray, oof: OutOfFold) -> CleanScorer:
    """The full model's clean_score mapped onto the out-of-fold probabilities (see the module docstring)."""
    honest = oof.scorer()
    target = honest(oof.observed)
    slope, intercept = platt_to_targets(full.log_odds(full_evidence), target)
    share = float(target.mean())
    logger.info("clean_score cross-fitted: clean share %.3f (in-sample %.3f), slope %.3f", share, full.clean_share,
                slope)
    return mapped(full, slope, intercept, share)
