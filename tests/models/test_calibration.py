"""clean_score calibrated on evidence from networks that never trained on the pair (models/calibration.py).

Two levels: the calibration maths on synthetic evidence whose clean share is known (the in-sample evidence made
over-confident the way memorisation makes it), and whole fits on small synthetic crawls (<= 2,000 pairs) whose
truth is known, cross-fitted against the in-sample calibration they replace."""

import numpy as np
import pytest

from bicro_clean.models.calibration import (
    MIN_FOLD_PAIRS,
    OutOfFold,
    can_cross_fit,
    cross_fitted,
    fold_of,
    platt_to_targets,
)
from bicro_clean.models.clean_score import CleanScorer
from bicro_clean.models.params import BiCroParams
from bicro_clean.models.train import fit_bicro, fit_epochs
from tests.models.test_clean_score import _mixture, evidence_matrix


def _memorised(columns: dict, clean: np.ndarray, lift: float, seed: int) -> dict:
    """The same pairs as networks that trained on them see them: every pair looks cleaner (the noisy ones too)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, values in columns.items():
        sign = -1.0 if name.startswith("loss") else 1.0
        out[name] = values + sign * lift * (1.0 + 0.3 * rng.standard_normal(len(values)))
    return out


@pytest.mark.parametrize("n,clean_share", [(1_500, 0.6), (2_000, 0.75), (20_000, 0.6)])
def test_cross_fitting_recovers_a_known_clean_share_that_in_sample_calibration_overstates(n, clean_share):
    columns, clean = _mixture(n, clean_share, seed=11)
    reference, _ = _mixture(n, 0.0, seed=111)
    in_sample = _memorised(columns, clean, lift=0.8, seed=12)
    naive = CleanScorer.fit(evidence_matrix(in_sample), evidence_matrix(reference))
    oof = OutOfFold(evidence_matrix(columns), evidence_matrix(reference))
    scorer = cross_fitted(naive, evidence_matrix(in_sample), oof)
    score = scorer(evidence_matrix(in_sample))
    truth = clean.mean()
    assert abs(score.mean() - truth) <= 0.03
    assert abs(naive(evidence_matrix(in_sample)).mean() - truth) > abs(score.mean() - truth) + 0.03
    kept = score >= 0.5  # the report's "expected precision" of the kept pairs is their mean clean_score
    assert abs(score[kept].mean() - clean[kept].mean()) <= 0.03
    assert scorer.clean_share == pytest.approx(score.mean(), abs=1e-3)
    # the full model's ranking is kept exactly
    order = np.argsort(naive.log_odds(evidence_matrix(in_sample)))
    assert np.all(np.diff(scorer.log_odds(evidence_matrix(in_sample))[order]) >= 0)


def test_platt_map_keeps_the_mean_of_its_targets_and_is_increasing():
    rng = np.random.default_rng(3)
    s = rng.normal(0, 3, 5_000)
    target = 1 / (1 + np.exp(-(0.4 * s - 0.7)))
    a, b = platt_to_targets(s, target)
    assert a == pytest.approx(0.4, rel=0.02) and b == pytest.approx(-0.7, abs=0.02)
    mapped = 1 / (1 + np.exp(-(a * s + b)))
    assert mapped.mean() == pytest.approx(target.mean(), abs=1e-4)
    a, _ = platt_to_targets(s, 1 / (1 + np.exp(0.4 * s)))  # targets that fall with s: the slope stops at its bound
    assert a > 0


def test_folds_are_balanced_seeded_and_only_used_with_enough_pairs():
    fold = fold_of(1_001, 2, seed=0)
    assert abs((fold == 0).sum() - (fold == 1).sum()) <= 1
    assert np.array_equal(fold, fold_of(1_001, 2, seed=0)) and not np.array_equal(fold, fold_of(1_001, 2, seed=1))
    assert can_cross_fit(2 * MIN_FOLD_PAIRS, 2) and not can_cross_fit(2 * MIN_FOLD_PAIRS - 1, 2)
    assert not can_cross_fit(10_000, 0)
    with pytest.raises(ValueError, match="1 fold cannot cross-fit"):
        BiCroParams(calibration_folds=1)


def _crawl(n: int, noise: float, seed: int, dim: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs sharing a latent, with a known `noise` share of captions moved to other pairs."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, dim)).astype(np.float32)
    image = latent + 0.8 * rng.standard_normal((n, dim)).astype(np.float32)
    text = latent + 0.8 * rng.standard_normal((n, dim)).astype(np.float32)
    noisy = np.flatnonzero(rng.random(n) < noise)
    text[noisy] = text[np.roll(noisy, 1)]
    clean = np.ones(n, dtype=bool)
    clean[noisy] = False
    return image, text, clean


FAST = dict(embed_dim=64, hidden_dim=128, epochs=6, batch_size=64, lr=1e-3, bank_size=256, threads=1)


def test_a_small_crawl_fit_is_calibrated_with_cross_fitting_and_over_confident_without():
    image, text, clean = _crawl(2_000, 0.4, seed=5)
    errors = {}
    default = BiCroParams().calibration_folds
    for folds in (0, default):
        params = BiCroParams(**FAST, calibration_folds=folds)
        epochs = []
        _, out = fit_bicro(image, text, params, on_epoch=lambda e, info: epochs.append(e))
        assert len(epochs) == fit_epochs(params, len(image)) == params.epochs * (1 + folds)
        score = out["clean_score"]
        kept = score >= 0.5
        errors[folds] = (abs(score.mean() - clean.mean()), abs(score[kept].mean() - clean[kept].mean()))
    assert errors[default][0] <= 0.03 and errors[default][1] <= 0.03, errors
    assert errors[0][0] > 0.05 and errors[0][1] > 0.05, errors  # trained-on evidence over-states both  # trained-on evidence over-states the kept pairs' precision


def test_held_out_pairs_calibrate_instead_of_fold_models():
    image, text, clean = _crawl(4_000, 0.4, seed=6)
    params = BiCroParams(**FAST)
    epochs = []
    model, out = fit_bicro(image[:2_000], text[:2_000], params, held_out=(image[2_000:], text[2_000:]),
                           on_epoch=lambda e, info: epochs.append(e))
    assert len(epochs) == params.epochs  # no fold models
    unseen = model.score(image[2_000:], text[2_000:])["clean_score"]  # what the score stage sees: unseen pairs
    kept = unseen >= 0.5
    assert abs(unseen.mean() - clean[2_000:].mean()) <= 0.03
    assert abs(unseen[kept].mean() - clean[2_000:][kept].mean()) <= 0.03
