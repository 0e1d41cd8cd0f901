"""The report's plots: kept/dropped histograms, the fitted loss mixtures and, per score column, kept fraction,
precision and recall against a threshold."""

from __future__ import annotations

import numpy as np

from bicro_clean.pipeline.report.diagnostics import LossView
from bicro_clean.pipeline.report.scan import HIST_BINS, Rule
from bicro_clean.pipeline.report.svg import (
    DROP_COLOR,
    INK,
    KEEP_COLOR,
    Frame,
    axes,
    bars,
    legend,
    polyline,
    svg,
    vline,
)
from bicro_clean.pipeline.report.threshold import ColumnBins

SMALL_PLOT = 390  # viewBox width of the three-across plots: their text then renders near its nominal size


def stacked_histogram(hists: dict[str, np.ndarray], xlabel: str, marker: tuple[float, str] | None,
                      span: tuple[float, float] = (0.0, 1.0)) -> str:
    """Kept and dropped counts per bin on `span` ([0, 1], or [-1, 1] for a cosine), stacked, with an optional
    vertical marker."""
    edges = np.linspace(span[0], span[1], HIST_BINS + 1)
    total = hists["keep"] + hists["drop"]
    frame = Frame(span[0], span[1], 0.0, max(float(total.max()), 1.0) * 1.08, width=SMALL_PLOT)
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


PRECISION_COLOR, RECALL_COLOR, KEPT_COLOR = KEEP_COLOR, "#ae3ec9", "#3b5bdb"
EXPECTED_COLOR = "#f08c00"
CURVE_STEP = 5  # draw every 5th of the 1,000 bin edges: 201 points per line


def threshold_plot(column: ColumnBins, rule: Rule) -> str:
    """Kept fraction, the expected precision (mean clean_score of the kept pairs), and the measured precision and
    recall of truly clean pairs when truth is known, against a threshold on one score column (exact at the drawn
    bin edges)."""
    xs, curves = column.edges()[::CURVE_STEP], column.curves()
    frame = Frame(column.lo, column.hi, 0.0, 1.05, width=SMALL_PLOT)
    parts = axes(frame, f"threshold on {column.name}", "fraction")
    items = [("kept", KEPT_COLOR)]
    expected = column.expected()  # from clean_score, no truth needed: measured precision is drawn next to it
    # "expected": the expected precision (a short label: four legend items fit the small plot's width)
    curves = {**curves, "expected": expected["precision"] if expected is not None else None}
    for name, color, dash in (("precision", PRECISION_COLOR, ""), ("recall", RECALL_COLOR, "5 3"),
                              ("expected", EXPECTED_COLOR, "2 2")):
        values = curves[name]
        if values is not None:
            ys = values[::CURVE_STEP]
            ok = np.isfinite(ys)
            parts.append(polyline(frame, xs[ok], ys[ok], color, 2.0, dash))
            items.append((name, color))
    parts.append(polyline(frame, xs, curves["kept"][::CURVE_STEP], KEPT_COLOR, 2.5))
    if rule.column == column.name and column.lo <= rule.threshold <= column.hi:
        parts.append(vline(frame, rule.threshold, f"this run {rule.threshold:.3g}",
                           low=frame.sx(rule.threshold) > frame.width / 2))
    parts += legend(frame, items)
    return svg(frame, parts, f"kept fraction, expected and measured precision and recall versus a threshold on "
                             f"{column.name}")
