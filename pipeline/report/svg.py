"""A small SVG plotting library: a data-to-pixel frame, axes, bars, lines, markers and legends.

Output is a plain string with coordinates rounded to one decimal, so the same data always gives the same bytes.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np

# The report's palette; report.css uses the same values for the cards and chips.
KEEP_COLOR, DROP_COLOR, INK, MUTED, GRID = "#2b8a5e", "#e0622a", "#1d2733", "#6b7785", "#e6e9ee"


@dataclass(frozen=True)
class Frame:
    """Data-to-pixel mapping of one plot."""

    x0: float
    x1: float
    y0: float
    y1: float
    width: int = 560
    height: int = 250
    left: int = 52
    right: int = 18
    top: int = 34
    bottom: int = 44

    def sx(self, x: float) -> float:
        return self.left + (x - self.x0) / ((self.x1 - self.x0) or 1.0) * (self.width - self.left - self.right)

    def sy(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.height - self.bottom - (y - self.y0) / span * (self.height - self.top - self.bottom)


def coord(value: float) -> str:
    """Pixel coordinates with one decimal: compact and identical across runs."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (steps of 1, 2, 2.5 or 5 x 10^k) inside [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_label(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else f"{int(value)}"


def axes(frame: Frame, xlabel: str, ylabel: str) -> list[str]:
    """Grid lines, tick labels and axis titles."""
    out = []
    for y in nice_ticks(frame.y0, frame.y1, 4):
        py = coord(frame.sy(y))
        out.append(f'<line x1="{frame.left}" x2="{frame.width - frame.right}" y1="{py}" y2="{py}" '
                   f'stroke="{GRID}"/><text x="{frame.left - 6}" y="{py}" dy="4" text-anchor="end" '
                   f'class="tick">{_tick_label(y)}</text>')
    base = coord(frame.height - frame.bottom)
    for x in nice_ticks(frame.x0, frame.x1, 5):
        out.append(f'<text x="{coord(frame.sx(x))}" y="{base}" dy="16" text-anchor="middle" '
                   f'class="tick">{_tick_label(x)}</text>')
    out.append(f'<line x1="{frame.left}" x2="{frame.width - frame.right}" y1="{base}" y2="{base}" stroke="#9aa5b1"/>')
    out.append(f'<text x="{coord((frame.left + frame.width - frame.right) / 2)}" y="{frame.height - 6}" '
               f'text-anchor="middle" class="label">{html.escape(xlabel)}</text>')
    out.append(f'<text transform="translate(13 {coord((frame.top + frame.height - frame.bottom) / 2)}) rotate(-90)" '
               f'text-anchor="middle" class="label">{html.escape(ylabel)}</text>')
    return out


def bars(frame: Frame, edges: np.ndarray, heights: np.ndarray, color: str,
         base: np.ndarray | None = None) -> list[str]:
    """One rect per non-empty bin, stacked on `base` when given."""
    base = np.zeros(len(heights)) if base is None else base
    out = []
    for lo, hi, h, b in zip(edges[:-1], edges[1:], heights, base):
        if h > 0:
            x, top = frame.sx(lo), frame.sy(b + h)
            out.append(f'<rect x="{coord(x + 0.5)}" y="{coord(top)}" width="{coord(max(frame.sx(hi) - x - 1, 0.5))}" '
                       f'height="{coord(frame.sy(b) - top)}" fill="{color}"/>')
    return out


def polyline(frame: Frame, xs: np.ndarray, ys: np.ndarray, color: str, width: float = 2.0,
             dash: str = "") -> str:
    points = " ".join(f"{coord(frame.sx(x))},{coord(frame.sy(min(y, frame.y1)))}" for x, y in zip(xs, ys))
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="{width}" '
            f'stroke-linejoin="round"{extra}/>')


def vline(frame: Frame, x: float, label: str, color: str = INK, low: bool = False) -> str:
    """Dashed marker with its label at the top (or, `low`, bottom-left, where a falling curve leaves room)."""
    px = coord(frame.sx(x))
    anchor = "end" if low or frame.sx(x) > frame.width * 0.7 else "start"
    dx = "-5" if anchor == "end" else "5"
    y = frame.height - frame.bottom - 8 if low else frame.top + 8
    return (f'<line x1="{px}" x2="{px}" y1="{frame.top - 4}" y2="{frame.height - frame.bottom}" stroke="{color}" '
            f'stroke-width="1.5" stroke-dasharray="5 4"/><text x="{px}" y="{y}" dx="{dx}" '
            f'text-anchor="{anchor}" class="note">{html.escape(label)}</text>')


def legend(frame: Frame, items: list[tuple[str, str]]) -> list[str]:
    out, x = [], frame.left
    for label, color in items:
        out.append(f'<rect x="{x}" y="10" width="12" height="12" rx="3" fill="{color}"/>'
                   f'<text x="{x + 17}" y="20" class="legend">{html.escape(label)}</text>')
        x += 30 + 7 * len(label)
    return out


def svg(frame: Frame, parts: list[str], title: str) -> str:
    return (f'<svg viewBox="0 0 {frame.width} {frame.height}" role="img" aria-label="{html.escape(title)}" '
            f'xmlns="http://www.w3.org/2000/svg" class="plot">{"".join(parts)}</svg>')
