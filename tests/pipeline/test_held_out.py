"""The held-out pairs a large crawl's clean_score is calibrated on: outside the fit sample, bounded, seeded."""

import numpy as np

from bicro_clean.pipeline import fit


def _flat(positions: list[np.ndarray], counts: list[int]) -> np.ndarray:
    starts = np.cumsum([0, *counts])[:-1]
    return np.concatenate([p + s for p, s in zip(positions, starts)])


def test_none_while_the_crawl_is_less_than_twice_the_sample():
    assert fit.held_out_positions([100, 100], 101, seed=0) is None
    assert fit.held_out_positions([100, 100], 0, seed=0) is None  # fit on every pair: nothing is held out
    assert fit.held_out_positions([100, 100], 100, seed=0) is not None


def test_outside_the_fit_sample_bounded_and_seeded(monkeypatch):
    monkeypatch.setattr(fit, "HELD_OUT_PAIRS", 500)
    counts = [700, 0, 1_300, 1_000]
    held = fit.held_out_positions(counts, 800, seed=3)
    assert held is not None and [len(p) for p in held] and all(np.all(np.diff(p) > 0) for p in held)
    assert all(np.all((p >= 0) & (p < c)) for p, c in zip(held, counts))
    flat = _flat(held, counts)
    assert len(flat) == 500
    sample = _flat(fit.sample_positions(counts, 800, seed=3), counts)
    assert not set(flat.tolist()) & set(sample.tolist())
    again = fit.held_out_positions(counts, 800, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(held, again))
    other = fit.held_out_positions(counts, 800, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(held, other))


def test_takes_every_outside_pair_when_there_are_fewer_than_the_bound(monkeypatch):
    monkeypatch.setattr(fit, "HELD_OUT_PAIRS", 10_000)
    counts = [30, 30]
    held = fit.held_out_positions(counts, 30, seed=0)
    flat = _flat(held, counts)
    sample = _flat(fit.sample_positions(counts, 30, seed=0), counts)
    assert sorted(flat.tolist() + sample.tolist()) == list(range(60))
