"""clean_score: calibrated on a mixture with a known clean share, monotone in each input, free of ties.

The synthetic evidence: clean and noisy pairs are two Gaussians with one covariance (so log f_clean / f_noisy is
linear, as the model assumes); the reference set (in a run: the pairs re-paired at random) is drawn from the noisy
component alone."""

import numpy as np
import pytest
import torch

from bicro_clean.models.clean_score import EVIDENCE, CleanScorer, evidence_matrix

NAMES = [name for name, _ in EVIDENCE]


def _mixture(n: int, clean_share: float, seed: int, separation: float = 2.0) -> tuple[dict, np.ndarray]:
    """Raw evidence columns (losses low and consistencies high when clean) with correlated noise shared by both
    components, and the truth."""
    rng = np.random.default_rng(seed)
    clean = rng.random(n) < clean_share
    f = len(EVIDENCE)
    mixing = np.random.default_rng(0).normal(size=(f, f)) * 0.3 + np.eye(f)  # one distribution for every seed
    noise = rng.normal(size=(n, f)) @ mixing.T
    oriented = noise + np.where(clean[:, None], separation / 2, -separation / 2)
    signs = np.array([sign for _, sign in EVIDENCE], dtype=float)
    raw = oriented * signs + np.array([0.5, 0.5, 0.2, 0.3, 0.3])  # back to each feature's own direction
    return {name: raw[:, i] for i, name in enumerate(NAMES)}, clean


def _fit(columns: dict, seed: int, separation: float = 2.0) -> CleanScorer:
    reference, _ = _mixture(len(next(iter(columns.values()))), 0.0, seed + 100, separation)
    return CleanScorer.fit(evidence_matrix(columns), evidence_matrix(reference))


@pytest.mark.parametrize("clean_share", [0.4, 0.6, 0.8])
def test_calibrated_on_a_mixture_with_a_known_clean_share(clean_share):
    columns, clean = _mixture(20_000, clean_share, seed=1)
    scorer = _fit(columns, 1)
    assert abs(scorer.clean_share - clean.mean()) < 0.02
    held_out, truth = _mixture(20_000, clean_share, seed=2)
    score = scorer(evidence_matrix(held_out))
    assert abs(score.mean() - truth.mean()) < 0.02  # mean clean_score = clean share
    bins = np.digitize(score, [0.2, 0.4, 0.6, 0.8])
    for b in range(5):  # and within each score band, the share of clean pairs matches the band's mean score
        in_bin = bins == b
        if in_bin.sum() > 200:
            assert abs(truth[in_bin].mean() - score[in_bin].mean()) < 0.06


def test_ranks_nearly_as_well_as_the_true_posterior():
    from sklearn.metrics import roc_auc_score

    columns, clean = _mixture(20_000, 0.6, seed=3, separation=0.8)
    scorer = _fit(columns, 3, separation=0.8)
    held_out, truth = _mixture(20_000, 0.6, seed=4, separation=0.8)
    score = scorer(evidence_matrix(held_out))
    best = max(roc_auc_score(truth, np.asarray(held_out[name]) * sign) for name, sign in EVIDENCE)
    assert roc_auc_score(truth, score) > best + 0.01  # the combination beats any one input


@pytest.mark.parametrize("feature", range(len(EVIDENCE)))
def test_monotone_in_each_input(feature):
    columns, clean = _mixture(5_000, 0.6, seed=5)
    scorer = _fit(columns, 5)
    name, sign = EVIDENCE[feature]
    base = {k: np.repeat(v[:200], 50) for k, v in columns.items()}
    steps = np.tile(np.linspace(-3.0, 3.0, 50), 200)
    moved = dict(base)
    moved[name] = base[name] + sign * steps  # towards "cleaner" as the step grows
    score = scorer(evidence_matrix(moved)).reshape(200, 50)
    assert np.all(np.diff(score, axis=1) >= 0)
    log_odds = scorer.log_odds(evidence_matrix(moved)).reshape(200, 50)
    assert np.all(np.diff(log_odds, axis=1) > 0)  # strictly: every input counts


def test_a_feature_that_points_the_wrong_way_gets_no_weight():
    columns, clean = _mixture(10_000, 0.6, seed=6)
    wrong = np.where(clean, 0.2, 0.8) + np.random.default_rng(6).normal(0, 0.2, len(clean))
    columns["r_i2t"] = wrong
    reference, _ = _mixture(len(clean), 0.0, 106)
    reference["r_i2t"] = 0.8 + np.random.default_rng(7).normal(0, 0.2, len(clean))
    scorer = CleanScorer.fit(evidence_matrix(columns), evidence_matrix(reference))
    assert scorer.weights[NAMES.index("r_i2t")] < 1e-5
    assert np.all(scorer.weights > 0)


def test_free_of_ties_even_far_in_the_tails():
    columns, clean = _mixture(50_000, 0.6, seed=7, separation=0.7)
    scorer = _fit(columns, 7, separation=0.7)
    score = scorer(evidence_matrix(columns))
    # log-odds beyond float32's resolution (about 17), within float64's (about 36: P(noisy) 1e-16)
    assert 17 < np.abs(scorer.log_odds(evidence_matrix(columns))).max() < 36
    distinct_inputs = len(np.unique(evidence_matrix(columns), axis=0))
    assert len(np.unique(score)) == distinct_inputs == 50_000
    assert score.dtype == np.float64 and 0.0 <= score.min() and score.max() <= 1.0


def test_survives_the_checkpoint_round_trip():
    columns, clean = _mixture(2_000, 0.6, seed=8)
    x = evidence_matrix(columns)
    scorer = _fit(columns, 8)
    again = CleanScorer.from_tensor(torch.from_numpy(scorer.to_tensor().numpy().copy()))
    assert np.array_equal(again(x), scorer(x))
