"""What a threshold buys, without labels: the run's one noise estimate, whether the threshold matters much on
this crawl, and (where the files carry noise_kind) how each kind of noise is detected.

clean_score is a calibrated P(clean), so its sums answer the questions truth would: the mean clean_score of a set
of pairs is its expected clean share. The noise estimate is 1 - mean clean_score over every pair with a
clean_score: the same definition as the run summary's and the manifest's, and the only noise figure the page
shows (the loss mixture's noisy weight is a parameter of the fit, not an estimate of the crawl's noise).
"""

from __future__ import annotations

import math
from typing import Any

from bicro_clean.pipeline.report.scan import Stats
from bicro_clean.pipeline.report.text import esc, stat_card
from bicro_clean.pipeline.report.threshold import BINS, ESTIMATE, ScoreBins

# The threshold "matters little" when every threshold from FLAT_RANGE[0] to FLAT_RANGE[1] makes the same decision
# for all but FLAT_SHARE of the scored pairs: fewer than 1 pair in 10 has a clean_score in that range, so
# choosing among those thresholds changes at most that share of the decisions. [0.2, 0.9] spans what a user
# would call "probably noisy" to "very likely clean"; a bimodal clean_score puts nearly every pair outside it.
FLAT_RANGE = (0.2, 0.9)
FLAT_SHARE = 0.10


def _recorded(manifest: dict[str, Any], name: str) -> float | None:
    value = (manifest.get("estimates") or {}).get(name)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def noise_estimate(manifest: dict[str, Any], bins: ScoreBins) -> float | None:
    """The run's noise estimate as its manifest records it (pipeline/estimates.py, the figure the run summary
    printed), so the page shows the very same number; computed from the scan's sums (the same definition) for a
    run whose manifest has none."""
    return _recorded(manifest, "noise_share") if _recorded(manifest, "noise_share") is not None else bins.noise_share()


def kept_precision(manifest: dict[str, Any], kept_sum: float, kept: int) -> float | None:
    """Mean clean_score of the pairs the run kept: the manifest's figure, else the scan's."""
    recorded = _recorded(manifest, "kept_precision")
    return recorded if recorded is not None else (kept_sum / kept if kept else None)


def noise_card(noise: float | None, bins: ScoreBins) -> list[str]:
    if noise is None or ESTIMATE not in bins.columns:
        return []
    n = int(bins.columns[ESTIMATE].estimated.sum())
    return [stat_card("est", "Estimated noise", f"{noise:.1%}", f"1 − mean clean_score over {n:,} scored pairs")]


def _edge(bins: ScoreBins, value: float) -> int:
    column = bins.columns[ESTIMATE]
    return int(round((value - column.lo) / (column.hi - column.lo) * BINS))


def flat_note(bins: ScoreBins) -> str:
    """A sentence on how much the clean_score threshold matters between FLAT_RANGE's ends (exact: both are bin
    edges of clean_score's [0, 1] bins); the words say so when it matters little."""
    column = bins.columns.get(ESTIMATE)
    expected = column.expected() if column is not None else None
    n = int(column.total.sum()) if column is not None else 0
    if expected is None or not n:
        return ""
    low, high = (_edge(bins, v) for v in FLAT_RANGE)
    moved = int(column.total[low:high].sum())  # kept at the lower threshold, not at the higher one
    precision = expected["precision"]
    figures = (f"Moving the clean_score threshold from {FLAT_RANGE[0]:g} to {FLAT_RANGE[1]:g} changes the kept "
               f"count by {moved:,} pairs ({moved / n:.1%} of the {n:,} scored pairs) and the expected precision "
               f"from {precision[low]:.1%} to {precision[high]:.1%}.")
    if moved / n < FLAT_SHARE:
        return (f'<p class="lead flat" id="flat-note">{figures} <b>On this crawl the threshold matters little:</b> '
                f"clean_score is bimodal here, nearly every pair scores below {FLAT_RANGE[0]:g} or above "
                f"{FLAT_RANGE[1]:g}, so any threshold in that range makes the same decision for at least "
                f"{1 - moved / n:.0%} of the pairs. The choice only concerns the few pairs in between.</p>")
    return (f'<p class="lead" id="flat-note">{figures} The threshold matters on this crawl: more than '
            f"{FLAT_SHARE:.0%} of the pairs lie between those two thresholds.</p>")


def kinds_table(stats: Stats) -> str:
    """Per noise kind (noise_kind column): pairs, kept share at this run's rule, AUROC against the clean pairs."""
    rows = stats.kind_rows()
    if not rows:
        return ""
    column = stats.kinds_column or ""
    cells = "".join(
        f'<tr><td><code>{esc(kind)}</code></td><td class="n">{pairs:,}</td><td class="n">{kept / max(pairs, 1):.1%}'
        f'</td><td class="n">{"–" if auroc is None else f"{auroc:.3f}"}</td></tr>'
        for kind, pairs, kept, auroc in rows)
    return (f'<div class="card kinds" id="kinds"><h3>Detection per noise kind</h3><p class="sub">From the '
            f'<code>noise_kind</code> column: the share of each kind this run kept, and the AUROC of '
            f'<code>{esc(column)}</code> for the truly clean pairs against that kind alone (0.5 is chance).</p>'
            f'<table><tr><th>kind</th><th>pairs</th><th>kept</th><th>AUROC</th></tr>{cells}</table></div>')
