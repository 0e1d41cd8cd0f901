"""The report's plots: kept/dropped histograms, the fitted loss mixtures and the kept-fraction curve."""

from __future__ import annotations

import numpy as np

from bicro_clean.pipeline.report.diagnostics import LossView
from bicro_clean.pipeline.report.scan import CURVE_BINS, HIST_BINS, Rule, Stats
from bicro_clean.pipeline.report.svg import (
    DROP_COLOR,
    INK,
    KEEP_COLOR,
    Frame,
    axes,
    bars,
    coord,
    legend,
    polyline,
    svg,
    vline,
)

SMALL_PLOT = 390  # viewBox width of the three-across plots: their text then renders near its nominal size


def stacked_histogram(hists: dict[str, np.ndarray], xlabel: str, marker: tuple[float, str] | None) -> str:
    """Kept and dropped counts per bin on [0, 1], stacked, with an optional vertical marker."""
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    total = hists["keep"] + hists["drop"]
    frame = Frame(0.0, 1.0, 0.0, max(float(total.max()), 1.0) * 1.08, width=SMALL_PLOT)
    parts = axes(frame, xlabel, "pairs")
    parts += bars(frame, edges, hists["keep"], KEEP_COLOR)
    parts += bars(frame, edges, hists["drop"], DROP_COLOR, base=hists["keep"])
    if marker is not None:
        parts.append(vline(frame, *marker))
    parts += legend(frame, [("kept", KEEP_COLOR), ("dropped", DROP_COLOR)])
    return svg(frame, parts, f"histogram of {xlabel}")


def mixture_plot(view: LossView, name: str) -> str:
    """Normalised-loss histogram (density) with the weighted clean/noisy components and their sum."""
    top = max(float(view.density.max()), float(np.percentile(view.clean_pdf + view.noisy_pdf, 99)), 1e-6)
    frame = Frame(float(view.edges[0]), float(view.edges[-1]), 0.0, top * 1.1)
    parts = axes(frame, f"normalised loss ({name})", "density")
    parts += bars(frame, view.edges, view.density, "#c9d2dc")
    parts.append(polyline(frame, view.grid, view.clean_pdf + view.noisy_pdf, INK, 1.5, "4 3"))
    parts.append(polyline(frame, view.grid, view.clean_pdf, KEEP_COLOR, 2.5))
    parts.append(polyline(frame, view.grid, view.noisy_pdf, DROP_COLOR, 2.5))
    parts += legend(frame, [("clean component", KEEP_COLOR), ("noisy component", DROP_COLOR),
                            ("mixture", INK)])
    return svg(frame, parts, f"fitted mixture, {name}")


def keep_curve(stats: Stats) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of scored pairs with soft_label >= t, at every bin edge t (exact there)."""
    at_least = np.cumsum(stats.curve[::-1])[::-1]
    fraction = np.append(at_least, stats.at_one) / max(stats.scored, 1)
    return np.linspace(0.0, 1.0, CURVE_BINS + 1), fraction


def curve_plot(stats: Stats, rule: Rule, kept_fraction: float) -> str:
    xs, ys = keep_curve(stats)
    frame = Frame(0.0, 1.0, 0.0, 1.05, width=SMALL_PLOT)
    parts = axes(frame, "threshold on soft_label", "fraction of scored pairs kept")
    step_x = np.repeat(xs, 2)[:-1]  # count(v >= t) for t inside a bin is the count at its upper edge
    step_y = np.repeat(ys, 2)[1:]
    parts.append(polyline(frame, step_x, step_y, "#3b5bdb", 2.5))
    if rule.column == "soft_label":
        label = f"{'cutoff' if rule.by_fraction else 'threshold'} {rule.threshold:.3g}: keeps {kept_fraction:.1%}"
        parts.append(vline(frame, rule.threshold, label, low=frame.sx(rule.threshold) > frame.width / 2))
        parts.append(f'<circle cx="{coord(frame.sx(rule.threshold))}" cy="{coord(frame.sy(kept_fraction))}" r="5" '
                     f'fill="#3b5bdb" stroke="#fff" stroke-width="2"/>')
    return svg(frame, parts, "kept fraction versus threshold")
