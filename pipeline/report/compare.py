"""clean_score next to the aligned encoder's own cosine (open_clip): do the two rankings agree?

With truth_clean known the report compares their AUROCs (scan.py's per-column AUROC histograms). Without truth it
shows how much they agree: Spearman's rank correlation, and the overlap of the two kept sets at the run's kept
fraction (the share of the top k by clean_score that is also in the top k by encoder_cosine).

Both need whole-run ranks, so they are computed on a seeded uniform sample of at most SAMPLE pairs, the ones
with the smallest seeded priorities (scan.priorities), so memory stays bounded and the sample does not depend on
file order. Runs up to SAMPLE scored pairs are covered in full, and the figures are then exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

SAMPLE = 200_000  # pairs: 24 bytes each; Spearman's standard error at this size is about 0.002
COMPARED = ("clean_score", "encoder_cosine")


@dataclass
class PairSample:
    """A seeded sample of (clean_score, encoder_cosine) over the scored pairs that have both."""

    priority: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    clean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    cosine: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    pairs: int = 0  # every scored pair with both values, sampled or not

    def add(self, clean: np.ndarray, cosine: np.ndarray, priority: np.ndarray) -> None:
        """One file's pairs (NaN in either column: not compared); keeps the SAMPLE smallest priorities."""
        both = np.isfinite(clean) & np.isfinite(cosine)
        self.pairs += int(both.sum())
        self.priority = np.concatenate([self.priority, priority[both]])
        self.clean = np.concatenate([self.clean, clean[both]])
        self.cosine = np.concatenate([self.cosine, cosine[both]])
        if len(self.priority) > 2 * SAMPLE:  # trimmed every SAMPLE new pairs, not every file: one sort each
            self.trim()

    def trim(self) -> None:
        """Down to the SAMPLE smallest priorities."""
        if len(self.priority) > SAMPLE:
            # the values break the (astronomically rare) ties of the 64-bit priorities, so the choice stays fixed
            keep = np.lexsort((self.cosine, self.clean, self.priority))[:SAMPLE]
            self.priority, self.clean, self.cosine = self.priority[keep], self.clean[keep], self.cosine[keep]

    @property
    def size(self) -> int:
        return min(len(self.priority), SAMPLE)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing their mean rank (what Spearman's correlation is defined on)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts + 1) / 2.0)[inverse.reshape(-1)]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of the average ranks; None below 2 pairs or when either side is constant."""
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a) - (len(a) + 1) / 2.0, average_ranks(b) - (len(b) + 1) / 2.0
    norm = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / norm) if norm > 0 else None


def top_k(values: np.ndarray, priority: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest values; ties (float32 cosines can tie) go to the seeded priority."""
    return np.lexsort((priority, -values))[:k]


@dataclass(frozen=True)
class Agreement:
    """How far clean_score and encoder_cosine agree, on `sample` of `pairs` scored pairs."""

    spearman: float | None
    overlap: float | None  # share of clean_score's top k also in encoder_cosine's top k
    k: int  # the top-k size in the sample
    kept_share: float  # k / sample: the overlap two unrelated rankings would have on average
    sample: int
    pairs: int


def agreement(sample: PairSample, kept_share: float) -> Agreement | None:
    """The agreement at the run's kept share (kept / scored); None without any pair that has both scores."""
    sample.trim()
    if sample.size == 0:
        return None
    k = round(kept_share * sample.size)
    overlap = None
    if k > 0:
        by_clean = top_k(sample.clean, sample.priority, k)
        by_cosine = top_k(sample.cosine, sample.priority, k)
        overlap = len(np.intersect1d(by_clean, by_cosine)) / k
    logger.debug("report: agreement on %d of %d pairs, k=%d", sample.size, sample.pairs, k)
    return Agreement(spearman(sample.clean, sample.cosine), overlap, k, k / sample.size, sample.size, sample.pairs)
