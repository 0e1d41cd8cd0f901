"""Detection per noise kind, where the annotated files carry a `noise_kind` column (benchmark shards made with
make-shards: clean, shuffle, near-miss, alt-text): per kind the pairs, how many the run kept, and the AUROC of
the selection column for the truly clean pairs against that kind alone.

Fixed-size per kind (a count pair and one AUC histogram); the kinds are the known ones (pipeline/noise_kinds.py)
plus `other` for any value not among them, so the partials stay bounded whatever the column holds and any
grouping of the files merges to the same figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bicro_clean.pipeline.noise_kinds import KINDS

OTHER = "other"
KIND_NAMES = (*KINDS, OTHER)
HistFn = Callable[[np.ndarray], np.ndarray]  # a row mask -> the selection column's AUC histogram of those rows
AurocFn = Callable[[np.ndarray, np.ndarray], "float | None"]  # (positive, negative histograms) -> AUROC


@dataclass
class KindStats:
    """Per kind: [pairs scored, pairs kept] and a histogram of the selection column over its scored pairs (on
    the AUROC bins of that column)."""

    counts: dict[str, np.ndarray] = field(default_factory=dict)
    hists: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, kinds: np.ndarray, kept: np.ndarray, hist_of: HistFn) -> None:
        """One file's scored rows: `kinds` the noise_kind per row (None where unknown), `kept` the decision."""
        known = np.not_equal(kinds, None).astype(bool)
        if not known.any():
            return
        names = np.where(np.isin(kinds, KINDS), kinds, OTHER)
        for name in KIND_NAMES:
            mask = known & (names == name)
            if not mask.any():
                continue
            counts = self.counts.setdefault(name, np.zeros(2, np.int64))
            counts += (int(mask.sum()), int((mask & kept).sum()))
            hist = hist_of(mask)
            self.hists[name] = self.hists[name] + hist if name in self.hists else hist

    def merge(self, part: "KindStats") -> None:
        for name, counts in part.counts.items():
            self.counts[name] = self.counts.get(name, np.zeros(2, np.int64)) + counts
            self.hists[name] = self.hists[name] + part.hists[name] if name in self.hists else part.hists[name].copy()

    def rows(self, clean: np.ndarray | None, auroc: AurocFn) -> list[tuple[str, int, int, float | None]]:
        """(kind, pairs, kept, AUROC of clean against this kind) in KIND_NAMES order; no AUROC for `clean`."""
        out = []
        for name in (n for n in KIND_NAMES if n in self.counts):
            pairs, kept = (int(v) for v in self.counts[name])
            score = None if name == "clean" or clean is None else auroc(clean, self.hists[name])
            out.append((name, pairs, kept, score))
        return out

