import numpy as np
import pytest

from bicro_clean.models.mixture import BetaMixture, GaussianMixture1D, fit_mixture


def _two_betas(n: int = 40_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    is_clean = rng.random(n) < 0.7
    x = np.where(is_clean, rng.beta(2.0, 10.0, n), rng.beta(9.0, 3.0, n))
    return x, is_clean


def test_bmm_recovers_known_components():
    x, _ = _two_betas()
    mix = BetaMixture.fit(x, iterations=50)
    clean = mix.clean_component()
    noisy = 1 - clean
    assert mix.weights[clean] == pytest.approx(0.7, abs=0.02)
    assert mix.alphas[clean] == pytest.approx(2.0, rel=0.15)
    assert mix.betas[clean] == pytest.approx(10.0, rel=0.15)
    assert mix.alphas[noisy] == pytest.approx(9.0, rel=0.15)
    assert mix.betas[noisy] == pytest.approx(3.0, rel=0.15)
    assert mix.noisy_weight() == pytest.approx(0.3, abs=0.02)


def test_bmm_default_iterations_separate_as_well_as_the_true_mixture():
    x, is_clean = _two_betas(seed=1)
    truth = BetaMixture(alphas=np.array([2.0, 9.0]), betas=np.array([10.0, 3.0]), weights=np.array([0.7, 0.3]))
    bayes = np.mean((truth.posterior_clean(x) > 0.5) == is_clean)
    mix = BetaMixture.fit(x)  # the 10 iterations used in training
    assert np.mean((mix.posterior_clean(x) > 0.5) == is_clean) > bayes - 0.005


def test_clean_component_is_lower_mean_regardless_of_order():
    x, _ = _two_betas(seed=2)
    mix = BetaMixture.fit(x)
    swapped = BetaMixture(
        alphas=mix.alphas[::-1].copy(), betas=mix.betas[::-1].copy(), weights=mix.weights[::-1].copy()
    )
    assert swapped.clean_component() == 1 - mix.clean_component()
    assert np.allclose(swapped.posterior_clean(x), mix.posterior_clean(x))
    # an explicit mixture whose clean (low-loss) component is index 1
    m = BetaMixture(alphas=np.array([8.0, 2.0]), betas=np.array([2.0, 8.0]), weights=np.array([0.4, 0.6]))
    assert m.clean_component() == 1
    assert m.posterior_clean(np.array([0.1]))[0] > 0.99
    assert m.posterior_clean(np.array([0.9]))[0] < 0.01
    assert m.noisy_weight() == pytest.approx(0.4)


def test_bmm_posterior_is_guarded_against_density_spike_at_zero():
    # the noisy component has a < 1: its density blows up at 0 and would call the smallest losses noisy
    m = BetaMixture(alphas=np.array([3.0, 0.6]), betas=np.array([12.0, 0.5]), weights=np.array([0.6, 0.4]))
    at_mean = m.posterior_clean(np.array([0.2]))[0]
    assert at_mean > 0.8
    assert m.posterior_clean(np.array([1e-6]))[0] >= at_mean
    # without the guard the posterior at the smallest losses would be far lower
    x = np.array([1e-4])
    raw = np.exp(m._log_joint(x))
    assert raw[0, 0] / raw[0].sum() < 0.5


def test_gmm_option_picks_lower_mean_component():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0.2, 0.05, 7000), rng.normal(0.7, 0.1, 3000)])
    mix = fit_mixture(x, "gmm")
    assert isinstance(mix, GaussianMixture1D)
    assert mix.means()[mix.clean_component()] == pytest.approx(0.2, abs=0.02)
    assert mix.noisy_weight() == pytest.approx(0.3, abs=0.02)
    restored = GaussianMixture1D.from_tensor(mix.to_tensor())
    assert np.array_equal(restored.posterior_clean(x), mix.posterior_clean(x))


def test_tensor_round_trip_and_bad_kind():
    x, _ = _two_betas(n=2000)
    mix = BetaMixture.fit(x)
    assert np.array_equal(BetaMixture.from_tensor(mix.to_tensor()).posterior_clean(x), mix.posterior_clean(x))
    with pytest.raises(ValueError):
        fit_mixture(x, "kmeans")
