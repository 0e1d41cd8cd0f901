"""clean_score: a calibrated, tie-free estimate of P(pair is clean) from the evidence BiCro already computes.

BiCro's own outputs rank poorly on their own: `soft_label` is a training label (1.0 for the top anchors, 0.0
below tau: thousands of exact ties) and `p_clean` is a mixture posterior that saturates at both ends.

The evidence of a pair is a small vector x (EVIDENCE: the two consistency ratios, the networks' mean cosine and
both networks' division losses, each oriented so that larger means cleaner). We know what a mismatched pair looks
like without any label: the same pairs with their images permuted (a `reference` set). Observed pairs are a
mixture, f = pi_c * f_clean + pi_n * f_ref. Modelling log(f_clean / f_ref) as linear, h(x) = w . z + b with
w >= 0 (z = standardised x), a classifier of observed-vs-reference pairs has the log-odds

    log(f / f_ref) = log(pi_n + pi_c * exp(h(x)))

and is fitted by maximum likelihood (L-BFGS-B, w bounded below). Then P(clean | x) = sigmoid(h(x) + log(pi_c /
pi_n)): calibrated when the noise looks like a random re-pairing (the mean clean_score over a set estimates its
clean share), monotone in every input (w >= 0), and a smooth function of continuous inputs, so distinct pairs tie
only at float resolution. Measured in docs/bicro.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit

logger = logging.getLogger(__name__)

# (output column, +1 when larger means cleaner, -1 when smaller does). The order is the checkpoint's layout.
EVIDENCE: tuple[tuple[str, int], ...] = (
    ("r_i2t", 1),  # consistency with the anchor nearest to the image
    ("r_t2i", 1),  # consistency with the anchor nearest to the caption
    ("match_score", 1),  # mean of the two networks' cosines
    ("loss0", -1),  # network 0's normalised division loss (hinge over the fixed negative bank)
    ("loss1", -1),  # network 1's
)
# Appended to EVIDENCE when the model has anchor margins on (models/margins.py): a 7-column layout.
MARGIN_EVIDENCE: tuple[tuple[str, int], ...] = (("margin_i2t", 1), ("margin_t2i", 1))
# Every weight at least this: the score then rises strictly with every input (no flat directions, fewer ties).
MIN_WEIGHT = 1e-6
# Ridge on the weights, RIDGE / N per unit: nothing at 16k pairs, but a few dozen pairs (which a linear
# classifier can separate from their re-pairing perfectly) no longer get log-odds in the hundreds.
RIDGE = 1.0
# The ridge while the clean share is estimated (CleanScorer.fit): small enough not to bias it, large enough to keep
# the weights finite on pairs a linear rule separates from their re-pairing.
PRIOR_RIDGE = 0.01
MAX_ITERATIONS = 500


def evidence_width(margins: bool) -> int:
    """F: the evidence columns of a model with anchor margins on or off."""
    return len(EVIDENCE) + (len(MARGIN_EVIDENCE) if margins else 0)


def evidence_matrix(columns: dict[str, np.ndarray]) -> np.ndarray:
    """(N, F) float64 evidence in EVIDENCE order, then MARGIN_EVIDENCE when `columns` has the margins (a model
    with anchor margins on outputs them), each column oriented so that larger = cleaner."""
    names = EVIDENCE + (MARGIN_EVIDENCE if all(name in columns for name, _ in MARGIN_EVIDENCE) else ())
    return np.stack([sign * np.asarray(columns[name], dtype=np.float64) for name, sign in names], axis=1)


def _log_odds_observed(theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log(f / f_ref) at z for theta = (w..., b, u) with pi_c = sigmoid(u)."""
    w, b, u = theta[:-2], theta[-2], theta[-1]
    log_pc, log_pn = torch.nn.functional.logsigmoid(u), torch.nn.functional.logsigmoid(-u)
    return torch.logaddexp(log_pn, log_pc + z @ w + b)


def _objective(theta_np: np.ndarray, z_obs: torch.Tensor, z_ref: torch.Tensor,
               ridge: float = 1.0) -> tuple[float, np.ndarray]:
    """Mean logistic loss of observed (label 1) vs reference (label 0) pairs, and its gradient."""
    theta = torch.tensor(theta_np, dtype=torch.float64, requires_grad=True)
    loss = (torch.nn.functional.softplus(-_log_odds_observed(theta, z_obs)).mean()
            + torch.nn.functional.softplus(_log_odds_observed(theta, z_ref)).mean()
            + ridge / len(z_obs) * (theta[:-2] ** 2).sum())
    loss.backward()
    assert theta.grad is not None
    return float(loss.detach()), theta.grad.numpy().copy()


def _minimise(start: np.ndarray, bounds: list, z_obs: torch.Tensor, z_ref: torch.Tensor, ridge: float) -> np.ndarray:
    result = minimize(_objective, start, args=(z_obs, z_ref, ridge), jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"maxiter": MAX_ITERATIONS})
    if not result.success:
        logger.warning("clean_score fit: %s", result.message)
    return result.x


@dataclass
class CleanScorer:
    """The fitted map evidence -> clean_score: plain arrays, stored in the checkpoint as one float64 tensor."""

    center: np.ndarray  # (F,) mean of the observed evidence
    scale: np.ndarray  # (F,) its standard deviation
    weights: np.ndarray  # (F,) >= MIN_WEIGHT: h(x) = weights . z + ...
    bias: float  # ... + bias, with log(pi_c / pi_n) folded in: log_odds = weights . z + bias
    clean_share: float  # pi_c: the estimated clean share of the pairs it was fitted on

    @classmethod
    def fit(cls, observed: np.ndarray, reference: np.ndarray) -> "CleanScorer":
        """`observed`: evidence of real pairs (N, F); `reference`: evidence of the same pairs re-paired at random.

        Two fits. The clean share first, with almost no ridge: the ridge shrinks w, and a weaker likelihood ratio
        is explained by a larger clean share (on 1,500 synthetic pairs the full ridge over-stated the share by
        0.04, PRIOR_RIDGE by 0.008). Then the weights with the share held fixed, under the full ridge, which keeps
        a few dozen separable pairs from log-odds in the hundreds."""
        center = observed.mean(axis=0)
        std = observed.std(axis=0)
        scale = np.where(std > 1e-12, std, 1.0)
        z_obs = torch.from_numpy((observed - center) / scale)
        z_ref = torch.from_numpy((reference - center) / scale)
        f = observed.shape[1]
        start = np.concatenate([np.ones(f), [0.0, 0.0]])
        bounds = [(MIN_WEIGHT, None)] * f + [(None, None), (-20.0, 20.0)]
        share = _minimise(start, bounds, z_obs, z_ref, PRIOR_RIDGE)[-1]
        theta = _minimise(start, bounds[:-1] + [(share, share)], z_obs, z_ref, RIDGE)
        weights, b, u = theta[:f], float(theta[f]), float(theta[f + 1])
        clean_share = float(expit(u))
        logger.info("clean_score: estimated clean share %.3f, weights %s", clean_share, np.round(weights, 3).tolist())
        return cls(center, scale, np.maximum(weights, MIN_WEIGHT), b + u, clean_share)  # log(pi_c/pi_n) = u

    def log_odds(self, evidence: np.ndarray) -> np.ndarray:
        return ((evidence - self.center) / self.scale) @ self.weights + self.bias

    def __call__(self, evidence: np.ndarray) -> np.ndarray:
        """clean_score in [0, 1], float64 (float32 would tie every pair with log-odds beyond about 17)."""
        return expit(self.log_odds(evidence))

    def to_tensor(self) -> torch.Tensor:
        tail = [self.bias, self.clean_share]
        return torch.from_numpy(np.concatenate([self.center, self.scale, self.weights, tail]).astype(np.float64))

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "CleanScorer":
        v = t.double().cpu().numpy()
        f = (len(v) - 2) // 3  # center, scale, weights (F each), bias, share: 5 or 7 evidence columns
        return cls(v[:f].copy(), v[f : 2 * f].copy(), v[2 * f : 3 * f].copy(), float(v[3 * f]), float(v[3 * f + 1]))
