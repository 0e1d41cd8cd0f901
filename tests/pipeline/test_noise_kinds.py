"""Noise kinds: exact disjoint counts, shuffle unchanged, near-miss on topic but never the same photo, varied
deterministic alt-text, mix proportions, flag resolution."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from bicro_clean.pipeline.alt_text import SLOTS, alt_texts
from bicro_clean.pipeline.noise import caption_noise, noisy_count
from bicro_clean.pipeline.noise_kinds import MIX_DEFAULTS, near_miss_donors, noise_plan, resolve_rates

SUBJECTS = ("dog", "cat", "horse", "boy", "girl", "cyclist", "surfer", "climber", "skier", "bird")
PLACES = ("beach", "snow", "grass", "street", "river", "mountain", "park", "pool", "desert", "forest")
ACTIONS = ("runs", "jumps", "sits", "plays", "walks")


def _corpus(photos: int = 60, per_photo: int = 5) -> tuple[np.ndarray, list[str]]:
    """Captions that share topics across photos: photo p shows SUBJECTS[p % 10] at PLACES[(p // 10) % 10]."""
    true_image = np.repeat(np.arange(photos), per_photo)
    captions = [f"A {SUBJECTS[p % 10]} {ACTIONS[c % 5]} on the {PLACES[(p // 10) % 10]} {'near a tree' * (c % 2)}"
                for p, c in zip(true_image, np.tile(np.arange(per_photo), photos))]
    return true_image, captions


def test_shuffle_alone_is_the_old_draw_exactly():
    # Frozen output of caption_noise before noise kinds existed (seed 7, 20 captions of 10 photos, rate 0.5).
    true_image = np.arange(20) // 2
    old = [0, 4, 1, 1, 8, 2, 6, 2, 7, 4, 3, 5, 5, 6, 3, 0, 7, 8, 9, 9]
    assert caption_noise(true_image, 0.5, 7).tolist() == old
    captions = [f"c{i}" for i in range(20)]
    plan = noise_plan(true_image, captions, {"shuffle": 0.5}, 7)
    assert plan.image.tolist() == old
    assert plan.caption.tolist() == list(range(20)) and plan.text == captions
    assert plan.counts() == {"clean": 10, "shuffle": 10, "near-miss": 0, "alt-text": 0}
    for seed in range(5):
        true_image, captions = _corpus()
        plan = noise_plan(true_image, captions, {"shuffle": 0.4}, seed)
        assert np.array_equal(plan.image, caption_noise(true_image, 0.4, seed))


@pytest.mark.parametrize("rates", [{"near-miss": 0.3}, {"alt-text": 0.25}, MIX_DEFAULTS,
                                   {"shuffle": 0.3, "near-miss": 0.3, "alt-text": 0.4}])
def test_counts_are_exact_and_kinds_disjoint(rates):
    true_image, captions = _corpus()
    n = len(captions)
    plan = noise_plan(true_image, captions, rates, seed=3)
    counts = plan.counts()
    for kind in ("shuffle", "near-miss", "alt-text"):
        assert counts[kind] == noisy_count(n, rates.get(kind, 0.0)), kind
    assert sum(counts.values()) == n  # one kind per pair: disjoint by construction, checked by the sum
    shuffled, near, alt, clean = (plan.kind == k for k in ("shuffle", "near-miss", "alt-text", "clean"))
    assert np.all(plan.image[shuffled] != true_image[shuffled])
    assert np.array_equal(plan.image[~shuffled], true_image[~shuffled])  # only shuffle moves images
    own = clean | shuffled
    assert np.all(plan.caption[alt] == -1) and np.array_equal(plan.caption[own], np.flatnonzero(own))
    assert np.all(true_image[plan.caption[near]] != true_image[near])
    assert np.array_equal(plan.clean, clean)
    assert [plan.text[i] for i in np.flatnonzero(~alt)] == [captions[j] for j in plan.caption[~alt]]


def test_mix_proportions_follow_the_rates():
    true_image, captions = _corpus(photos=200)
    plan = noise_plan(true_image, captions, MIX_DEFAULTS, seed=0)
    assert plan.counts() == {"clean": 600, "shuffle": 150, "near-miss": 150, "alt-text": 100}
    again = noise_plan(true_image, captions, MIX_DEFAULTS, seed=0)
    assert np.array_equal(plan.kind, again.kind) and plan.text == again.text  # seeded
    other = noise_plan(true_image, captions, MIX_DEFAULTS, seed=1)
    assert not np.array_equal(plan.kind, other.kind)


def test_near_miss_is_never_the_same_photo_and_is_on_topic():
    true_image, captions = _corpus()
    rows = np.arange(len(captions))
    donors = near_miss_donors(captions, true_image, rows, 5, np.random.default_rng(0))
    assert np.all(true_image[donors] != true_image[rows])
    own_texts = {p: {captions[i] for i in np.flatnonzero(true_image == p)} for p in set(true_image.tolist())}
    assert all(captions[d] not in own_texts[true_image[r]] for r, d in zip(rows, donors))  # no duplicate text
    tfidf = TfidfVectorizer().fit_transform(captions)

    def similarity(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.asarray(tfidf[a].multiply(tfidf[b]).sum(axis=1)).mean())

    def same_topic(a: np.ndarray, b: np.ndarray) -> float:  # same subject or same place
        photo_a, photo_b = true_image[a], true_image[b]
        return float(np.mean((photo_a % 10 == photo_b % 10) | (photo_a // 10 == photo_b // 10)))

    random_other = (rows + len(captions) // 2 + 7) % len(captions)
    assert similarity(rows, donors) > similarity(rows, random_other) + 0.2
    assert same_topic(rows, donors) > 0.9 and same_topic(rows, random_other) < 0.5


def test_near_miss_draws_among_the_top_k():
    true_image, captions = _corpus()
    rows = np.arange(len(captions))
    one = near_miss_donors(captions, true_image, rows, 1, np.random.default_rng(0))
    assert np.array_equal(one, near_miss_donors(captions, true_image, rows, 1, np.random.default_rng(5)))
    several = [near_miss_donors(captions, true_image, rows, 8, np.random.default_rng(s)) for s in range(4)]
    assert len({tuple(d) for d in several}) == 4  # k > 1: the seed chooses among the close captions


def test_near_miss_with_duplicate_texts_and_errors():
    captions = ["a dog on grass", "a dog on grass", "a dog on the grass", "a red car"]
    photo = np.array([0, 1, 1, 2])
    donors = near_miss_donors(captions, photo, np.array([0]), 5, np.random.default_rng(0))
    assert captions[donors[0]] in ("a dog on the grass", "a red car")  # photo 1's copy of the text is refused
    with pytest.raises(ValueError, match="two different photos"):
        near_miss_donors(["a", "b"], np.array([0, 0]), np.array([0]), 3, np.random.default_rng(0))


def test_alt_text_is_deterministic_and_varied():
    first = alt_texts(2000, 11)
    assert first == alt_texts(2000, 11) and first != alt_texts(2000, 12)
    assert len(set(first)) > 1800  # random fragments and numbers: few collisions
    assert all(s.strip() and len(s) < 300 for s in first)
    assert 2 <= np.mean([len(s.split()) for s in first]) <= 12
    # every slot shows up: file names, dates, sizes, prices ...
    joined = "\n".join(first)
    for pattern in (r"\.(jpe?g|JPG|png|PNG)", r"\d{4}-\d{2}-\d{2}", r"\d+x\d+", r"[$€£]\d+", r"©", r"(?i)share"):
        assert re.search(pattern, joined), pattern
    rng = np.random.default_rng(0)
    for name, slot in SLOTS.items():
        outputs = {slot(rng) for _ in range(200)}
        assert len(outputs) > 50, name


def test_resolve_rates_from_flags():
    assert resolve_rates("shuffle", None) == {"shuffle": 0.0}
    assert resolve_rates("shuffle", None, default_rate=0.4) == {"shuffle": 0.4}
    assert resolve_rates("near-miss", 0.2) == {"near-miss": 0.2}
    assert resolve_rates("mix") == MIX_DEFAULTS
    assert resolve_rates("mix", mix={"shuffle": None, "near-miss": 0.3, "alt-text": None}) == {
        "shuffle": 0.15, "near-miss": 0.3, "alt-text": 0.10}
    with pytest.raises(ValueError, match="mix only"):
        resolve_rates("shuffle", 0.2, {"near-miss": 0.1})
    with pytest.raises(ValueError, match="single kind"):
        resolve_rates("mix", 0.4)
    with pytest.raises(ValueError, match="add up to"):
        resolve_rates("mix", mix={"shuffle": 0.6, "near-miss": 0.5})
    with pytest.raises(ValueError, match="unknown noise kind"):
        resolve_rates("typo", 0.1)
