"""Kinds of synthetic noise for benchmark data: which pairs get which kind, and what each noisy pair becomes.

A web crawl has more than one kind of wrong caption. Each kind replaces one side of a pair:

- ``shuffle``: the caption is paired with the image of another, random caption (pipeline/noise.py, the
  NCR / BiCro protocol; with this kind alone the draw is exactly `caption_noise`'s for the same seed);
- ``near-miss``: the image keeps its place and the caption is replaced by a caption of ANOTHER photo, drawn at
  random among the ``k`` captions most similar in text (TF-IDF cosine) to the pair's own caption: on the right
  topic, describing a different photo. Never a caption of the same photo, nor a text equal to one of them;
- ``alt-text``: the caption is replaced by generated boilerplate (pipeline/alt_text.py) that describes nothing;
- ``mix``: all three at once, each with its own rate.

Counts are exact: floor(rate * N) pairs per kind, disjoint, drawn with one seeded generator.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from bicro_clean.pipeline.alt_text import alt_texts
from bicro_clean.pipeline.noise import noisy_count, shuffle_images

logger = logging.getLogger(__name__)

NOISY_KINDS = ("shuffle", "near-miss", "alt-text")  # the order in which a mix assigns its pairs
KINDS = ("clean", *NOISY_KINDS)
NOISE_KIND_CHOICES = (*NOISY_KINDS, "mix")
MIX_DEFAULTS = {"shuffle": 0.15, "near-miss": 0.15, "alt-text": 0.10}
NEAR_MISS_K = 5
_CHUNK = 512  # near-miss queries per dense similarity block: 512 x 40k float32 = 80 MB


# --------------------------------------------------------------------------------------------------- rates


def resolve_rates(kind: str, noise_rate: float | None = None, mix: Mapping[str, float | None] | None = None,
                  default_rate: float = 0.0) -> dict[str, float]:
    """Rate per noisy kind from the command-line flags: one `noise_rate` for a single kind, the per-kind rates
    (`mix`, MIX_DEFAULTS where None) for `mix`. A flag that does not belong to `kind` is an error, not ignored."""
    given = {k: v for k, v in (mix or {}).items() if v is not None}
    if kind == "mix":
        if noise_rate is not None:
            raise ValueError("--noise-rate is for a single kind; mix takes --shuffle-rate, --near-miss-rate and "
                             "--alt-text-rate")
        unknown = set(given) - set(NOISY_KINDS)
        if unknown:
            raise ValueError(f"unknown noise kinds {sorted(unknown)}; expected some of {NOISY_KINDS}")
        rates = {**MIX_DEFAULTS, **given}
    elif kind in NOISY_KINDS:
        if given:
            raise ValueError(f"per-kind rates ({', '.join(sorted(given))}) go with --noise-kind mix only")
        rates = {kind: default_rate if noise_rate is None else noise_rate}
    else:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KIND_CHOICES}")
    return check_rates(rates)


def check_rates(rates: Mapping[str, float]) -> dict[str, float]:
    for kind, rate in rates.items():
        if kind not in NOISY_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; expected some of {NOISY_KINDS}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{kind} rate must be in [0, 1], got {rate}")
    if sum(rates.values()) > 1.0 + 1e-9:
        raise ValueError(f"noise rates add up to {sum(rates.values()):g} > 1")
    return {kind: float(rates[kind]) for kind in NOISY_KINDS if kind in rates}


# ---------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class NoisePlan:
    """What each pair (one caption slot) becomes. Row i keeps its own caption and image unless kind[i] says
    otherwise."""

    kind: np.ndarray  # (N,) str: clean | shuffle | near-miss | alt-text
    image: np.ndarray  # (N,) image paired with the slot (another image for shuffle)
    caption: np.ndarray  # (N,) index of the caption in the slot (a donor for near-miss), -1 for alt-text
    text: list[str]  # (N,) the slot's caption text (own, donor or boilerplate)

    def counts(self) -> dict[str, int]:
        return {kind: int(np.sum(self.kind == kind)) for kind in KINDS}

    @property
    def clean(self) -> np.ndarray:
        return self.kind == "clean"


def noise_plan(true_image: np.ndarray, captions: Sequence[str], rates: Mapping[str, float], seed: int,
               near_miss_k: int = NEAR_MISS_K) -> NoisePlan:
    """Draw the noise of every kind in `rates` over the captions (true_image[i] = photo of caption i)."""
    true_image = np.asarray(true_image, dtype=np.int64)
    n = len(true_image)
    if len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    rates = check_rates(rates)
    counts = {kind: noisy_count(n, rate) for kind, rate in rates.items()}
    rng = np.random.default_rng(seed)
    # The same first draw as caption_noise: with shuffle alone, the plan is its draw exactly.
    chosen = rng.choice(n, size=sum(counts.values()), replace=False)
    parts = dict(zip(counts, np.split(chosen, np.cumsum(list(counts.values()))[:-1])))
    kind = np.full(n, "clean", dtype=object)
    image, caption, text = true_image.copy(), np.arange(n), list(captions)
    if len(parts.get("shuffle", ())):
        image = shuffle_images(true_image, parts["shuffle"], rng)
        kind[image != true_image] = "shuffle"  # a single chosen caption cannot be shuffled: it stays clean
    if len(parts.get("near-miss", ())):
        rows = np.sort(parts["near-miss"])
        caption[rows] = near_miss_donors(captions, true_image, rows, near_miss_k, rng)
        kind[rows] = "near-miss"
        for row in rows:
            text[row] = captions[caption[row]]
    if len(parts.get("alt-text", ())):
        rows = np.sort(parts["alt-text"])
        caption[rows] = -1
        kind[rows] = "alt-text"
        for row, string in zip(rows, alt_texts(len(rows), rng)):
            text[row] = string
    plan = NoisePlan(kind.astype(str), image, caption, text)
    logger.info("noise plan over %d pairs: %s", n, plan.counts())
    return plan


# ----------------------------------------------------------------------------------------------- near-miss


def _normalised(caption: str) -> str:
    return " ".join(caption.lower().split()).strip(" .")


def _own_texts(captions: Sequence[str], photo: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """(photos x distinct texts) incidence and each caption's text id: a donor may not repeat any caption of
    the pair's photo, even one written for another photo (Flickr8k has such duplicates)."""
    _, text_id = np.unique([_normalised(c) for c in captions], return_inverse=True)
    text_id = text_id.ravel()
    shape = (int(photo.max()) + 1, int(text_id.max()) + 1)
    incidence = sp.csr_matrix((np.ones(len(photo), dtype=np.int8), (photo, text_id)), shape=shape)
    return incidence, text_id


def _tfidf(captions: Sequence[str]) -> sp.csr_matrix:
    """L2-normalised TF-IDF rows. Stop words out: similarity should come from what a caption is about (dog,
    beach, bicycle), not from "a ... the"; captions made only of stop words fall back to every word."""
    try:
        return TfidfVectorizer(stop_words="english", sublinear_tf=True, dtype=np.float32).fit_transform(captions)
    except ValueError:  # empty vocabulary
        return TfidfVectorizer(sublinear_tf=True, dtype=np.float32, token_pattern=r"(?u)\b\w+\b").fit_transform(
            captions)


def near_miss_donors(captions: Sequence[str], photo: np.ndarray, rows: np.ndarray, k: int,
                     rng: np.random.Generator) -> np.ndarray:
    """For each row, a caption index drawn uniformly among the `k` captions of other photos most similar in text
    (TF-IDF cosine over content words) to the row's own caption."""
    if k < 1:
        raise ValueError(f"near-miss k must be >= 1, got {k}")
    photo = np.asarray(photo, dtype=np.int64)
    tfidf = _tfidf(captions)
    incidence, text_id = _own_texts(captions, photo)
    donors = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), _CHUNK):
        block = rows[start : start + _CHUNK]
        sims = (tfidf[block] @ tfidf.T).toarray()
        sims[incidence[photo[block]][:, text_id].toarray() > 0] = -np.inf  # own photo and its texts
        donors[start : start + len(block)] = _draw_top_k(sims, k, rng)
    return donors


def _draw_top_k(sims: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, one column drawn uniformly among the k highest (fewer where fewer are allowed)."""
    k = min(k, sims.shape[1])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    allowed = np.isfinite(np.take_along_axis(sims, top, axis=1))
    available = allowed.sum(axis=1)
    if np.any(available == 0):
        raise ValueError("near-miss noise needs captions of at least two different photos")
    # rank allowed candidates first, then draw a position below each row's count of allowed ones
    order = np.argsort(~allowed, axis=1, kind="stable")
    pick = (rng.random(len(sims)) * available).astype(np.int64)
    return top[np.arange(len(sims)), order[np.arange(len(sims)), pick]]
