"""A self-contained HTML report of one cleaning run: `OUTPUT/report.html`.

Everything is inlined (CSS, SVG plots drawn by the small helpers below, thumbnails as base64 JPEG data URIs), so
the file can be mailed around or opened offline. The bytes depend only on the run's outputs: no timestamps,
seeded sampling, sorted iteration and fixed number formatting, so rerunning a cached run rewrites the same file.

Memory stays bounded by one shard: histograms and gallery picks are aggregated per annotated file, the loss
sample is scored per embeddings file, and thumbnails are cut while streaming only the shards that hold them.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.layout import REPORT, embedding_path
from bicro_clean.pipeline.parquet_io import atomic_output, join
from bicro_clean.pipeline.score import fixed_list_matrix, local_checkpoint
from bicro_clean.pipeline.shards import IMAGE_EXTENSIONS, REASONS, SAFE_IMAGE_FORMATS, RawSample, iter_shard, shard_id
from bicro_clean.pipeline.writers import read_json

logger = logging.getLogger(__name__)

GALLERY_SIZE = 12
LOSS_SAMPLE = 20_000
THUMB_PX = 128
HIST_BINS = 40
CURVE_BINS = 200
AUC_BINS = 10_000  # AUROC from per-class histograms: exact up to ties inside a 1e-4 wide bin
ROW_COLUMNS = ("shard", "key", "decision", "reason", "caption", "p_clean", "consistency", "soft_label",
               "match_score", "anchor_key_i2t", "anchor_key_t2i", "truth_clean")
SELECT_REASONS = {
    "kept": "Kept: the score passed the selection rule.",
    "noisy_division": "Dropped: the mixture put the pair in its noisy set (p_clean <= bicro.clean_threshold).",
    "below_keep_fraction": "Dropped: ranked below the select.keep_fraction cutoff.",
}
SMALL_PLOT = 390  # viewBox width of the three-across plots: their text then renders near its nominal size
KEEP_COLOR, DROP_COLOR, INK, MUTED, GRID = "#2b8a5e", "#e0622a", "#1d2733", "#6b7785", "#e6e9ee"


# ================================================================ entry point


def write_report(config: CleanConfig, manifest_path: str) -> str:
    """Write `OUTPUT/report.html` atomically from the run's manifest and outputs; returns its path."""
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise FileNotFoundError(f"no readable manifest at {manifest_path}")
    page = build_report(config, manifest)
    path = join(config.output, REPORT)
    with atomic_output(path) as tmp, fsspec.open(tmp, "wb") as fh:
        fh.write(page.encode("utf-8"))
    logger.info("report: wrote %s (%d KB)", path, len(page) // 1024)
    return path


def build_report(config: CleanConfig, manifest: dict[str, Any]) -> str:
    """The whole HTML page as a string."""
    rule = Rule.from_run(config, manifest)
    stats, picks = scan_annotated(annotated_paths(config, manifest), rule, config.bicro.seed)
    losses = loss_diagnostics(config, manifest)
    thumbs = fetch_thumbnails(shard_urls(manifest, picks), config)
    return render_page(config, manifest, rule, stats, picks, losses, thumbs)


# ================================================================ run files


@dataclass(frozen=True)
class Rule:
    """The selection rule as it was applied: column and the effective threshold (keep_fraction's cut value)."""

    column: str
    threshold: float
    by_fraction: bool

    @classmethod
    def from_run(cls, config: CleanConfig, manifest: dict[str, Any]) -> "Rule":
        value = (manifest.get("cutoff") or {}).get("value")
        if config.select.keep_fraction is not None and isinstance(value, (int, float)) and math.isfinite(value):
            return cls(config.select.column, float(value), True)
        return cls(config.select.column, float(config.select.threshold), False)


def annotated_paths(config: CleanConfig, manifest: dict[str, Any]) -> list[str]:
    return [join(config.output, o["path"]) for o in manifest.get("outputs", []) if o.get("kind") == "annotated"]


def checkpoint_dir(config: CleanConfig, manifest: dict[str, Any]) -> str | None:
    path = (manifest.get("checkpoint") or {}).get("path")
    return join(config.output, path) if path else None


def shards_by_id(manifest: dict[str, Any]) -> dict[str, str]:
    """shard_id -> input URL, to resolve anchor keys (`<shard_id>/<key>`) to the shard holding the anchor."""
    return {shard_id(i["url"]): i["url"] for i in manifest.get("inputs", [])}


def split_pair_key(pair: str) -> tuple[str, str]:
    """`<shard_id>/<key>` (pipeline.score.pair_key) -> (shard_id, key); shard ids never contain '/'."""
    sid, _, key = pair.partition("/")
    return sid, key


# ================================================================ annotated scan: histograms and gallery picks


@dataclass
class Stats:
    """Everything the plots and counts need, summed over annotated files (fixed-size arrays)."""

    soft: dict[str, np.ndarray] = field(default_factory=lambda: {d: np.zeros(HIST_BINS, np.int64)
                                                                 for d in ("keep", "drop")})
    p_clean: dict[str, np.ndarray] = field(default_factory=lambda: {d: np.zeros(HIST_BINS, np.int64)
                                                                    for d in ("keep", "drop")})
    curve: np.ndarray = field(default_factory=lambda: np.zeros(CURVE_BINS, np.int64))
    at_one: int = 0  # soft_label == 1 exactly (anchors): kept even at threshold 1
    auc: dict[bool, np.ndarray] = field(default_factory=lambda: {t: np.zeros(AUC_BINS, np.int64)
                                                                 for t in (True, False)})
    truth: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("rows", "noisy", "kept", "kept_clean", "clean_scored"), 0))
    scored: int = 0


def _hist(values: np.ndarray, bins: int) -> np.ndarray:
    return np.histogram(np.clip(values, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0].astype(np.int64)


def _floats(table: Any, column: str) -> np.ndarray:
    return np.asarray(pc.fill_null(table[column], float("nan")).to_numpy(zero_copy_only=False), dtype=np.float64)


def read_rows(path: str, rule_column: str) -> dict[str, np.ndarray]:
    """The columns the report needs from one annotated file (whichever of them it has)."""
    with fsspec.open(path, "rb") as fh:
        names = set(pq.read_schema(fh).names)
        wanted = sorted(c for c in {*ROW_COLUMNS, rule_column} if c in names)
        table = pq.read_table(fh, columns=wanted)
    rows = {c: np.asarray(table[c].to_pylist(), dtype=object) for c in wanted}
    for column in {"p_clean", "consistency", "soft_label", "match_score", rule_column} & names:
        rows[column] = _floats(table, column)
    rows.setdefault("truth_clean", np.full(table.num_rows, None, dtype=object))
    return rows


def add_stats(stats: Stats, rows: dict[str, np.ndarray]) -> None:
    scored = (rows["decision"] != "error") & ~np.isnan(rows["soft_label"])
    stats.scored += int(scored.sum())
    for decision in ("keep", "drop"):
        chosen = scored & (rows["decision"] == decision)
        stats.soft[decision] += _hist(rows["soft_label"][chosen], HIST_BINS)
        stats.p_clean[decision] += _hist(rows["p_clean"][chosen], HIST_BINS)
    soft = rows["soft_label"][scored]
    stats.curve += _hist(soft, CURVE_BINS)
    stats.at_one += int((soft >= 1.0).sum())
    add_truth(stats, rows, scored)


def add_truth(stats: Stats, rows: dict[str, np.ndarray], scored: np.ndarray) -> None:
    truth = rows["truth_clean"]
    known = np.array([t is not None for t in truth], dtype=bool)
    clean = np.array([t is True for t in truth], dtype=bool)
    kept = rows["decision"] == "keep"
    for name, mask in (("rows", known), ("noisy", known & ~clean), ("kept", known & kept),
                       ("kept_clean", clean & kept), ("clean_scored", clean & scored)):
        stats.truth[name] += int(mask.sum())
    for label, mask in ((True, clean & scored), (False, known & ~clean & scored)):
        stats.auc[label] += _hist(rows["soft_label"][mask], AUC_BINS)


def binned_auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(score_pos > score_neg) + P(tie)/2 from two histograms on the same bins."""
    n_pos, n_neg = int(positive.sum()), int(negative.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.cumsum(negative) - negative  # negatives in strictly lower bins
    wins = float((positive * below).sum()) + 0.5 * float((positive * negative).sum())
    return wins / (n_pos * n_neg)


# ---------------------------------------------------------------- gallery picks


Pick = tuple[tuple, dict[str, Any]]  # (sort key, row); the smallest sort keys win


def _priority(seed: int, shard: str, key: str) -> int:
    """Seeded pseudo-random rank of a row, independent of file order (a reservoir without the reservoir)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{shard}\0{key}".encode(), digest_size=8).digest(), "big")


def _row(rows: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {c: (float(v[i]) if v.dtype.kind == "f" else v[i]) for c, v in rows.items()}


def _smallest(rows: dict[str, np.ndarray], index: Iterable[int], sort_key: Any) -> list[Pick]:
    best = heapq.nsmallest(GALLERY_SIZE, index, key=sort_key)
    return [(sort_key(i), _row(rows, i)) for i in best]


def file_picks(rows: dict[str, np.ndarray], rule: Rule, seed: int) -> dict[str, list[Pick]]:
    """Each gallery's best rows in one file. Ties (many soft labels are exactly 0, 0.5 or 1) go to a seeded
    random order, so a gallery is not just the first shard's first keys."""
    shard, key, soft, p_clean = rows["shard"], rows["key"], rows["soft_label"], rows["p_clean"]
    scored = np.flatnonzero((rows["decision"] != "error") & ~np.isnan(soft))
    value = rows[rule.column]
    kept = np.flatnonzero(rows["decision"] == "keep")
    rank = {int(i): (_priority(seed, shard[i], key[i]), shard[i], key[i]) for i in np.union1d(scored, kept)}
    return {
        "lowest": _smallest(rows, scored, lambda i: (soft[i], p_clean[i], *rank[i])),
        "borderline": _smallest(rows, scored[~np.isnan(value[scored])],
                                lambda i: (abs(value[i] - rule.threshold), *rank[i])),
        "random_kept": _smallest(rows, kept, lambda i: rank[i]),
    }


def merge_picks(into: dict[str, list[Pick]], new: dict[str, list[Pick]]) -> None:
    for name, picks in new.items():
        into[name] = heapq.nsmallest(GALLERY_SIZE, into.get(name, []) + picks, key=lambda p: p[0])


def scan_annotated(paths: list[str], rule: Rule, seed: int) -> tuple[Stats, dict[str, list[dict[str, Any]]]]:
    """One pass over the annotated files: summed histograms and the three galleries' rows."""
    stats, picks = Stats(), {}
    for path in paths:
        rows = read_rows(path, rule.column)
        add_stats(stats, rows)
        merge_picks(picks, file_picks(rows, rule, seed))
    return stats, {name: [row for _, row in found] for name, found in picks.items()}


# ================================================================ mixture diagnostics


@dataclass
class LossView:
    """One network's normalised-loss histogram (as a density) and its fitted mixture on a grid."""

    edges: np.ndarray
    density: np.ndarray
    grid: np.ndarray
    clean_pdf: np.ndarray
    noisy_pdf: np.ndarray
    noisy_weight: float
    clean_mean: float


@dataclass
class LossDiagnostics:
    views: list[LossView]
    sample: int
    division: str

    @property
    def noisy_weight(self) -> float:
        return float(np.mean([v.noisy_weight for v in self.views]))


def _exists(path: str) -> bool:
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    return fs.exists(local)


def _ok_rows(path: str, columns: list[str]) -> Any:
    with fsspec.open(path, "rb") as fh:
        table = pq.read_table(fh, columns=["status", *columns])
    return table.filter(pc.equal(table["status"], "ok"))


def sample_losses(model: Any, paths: list[str], sample: int, seed: int) -> list[np.ndarray]:
    """Normalised losses per network for a seeded uniform sample of ok rows, scored one file at a time."""
    from bicro_clean.models.diagnostics import normalised_losses
    from bicro_clean.pipeline.run import sample_positions

    counts = [_ok_rows(p, []).num_rows for p in paths]
    parts: list[list[np.ndarray]] = []
    for path, positions in zip(paths, sample_positions(counts, sample, seed)):
        if len(positions):
            table = _ok_rows(path, ["image_emb", "text_emb"]).take(positions)
            parts.append(normalised_losses(model, fixed_list_matrix(table["image_emb"]),
                                           fixed_list_matrix(table["text_emb"])))
    return [np.concatenate([p[k] for p in parts]) for k in range(len(model.nets))] if parts else []


def loss_view(mixture: Any, losses: np.ndarray) -> LossView:
    from bicro_clean.models.diagnostics import mixture_density

    lo, hi = min(0.0, float(losses.min())), max(1.0, float(losses.max()))
    counts, edges = np.histogram(losses, bins=HIST_BINS, range=(lo, hi))
    density = counts / max(counts.sum() * (edges[1] - edges[0]), 1e-12)
    grid = np.linspace(lo, hi, 241)[1:-1]  # open interval: a Beta density can be infinite at 0 and 1
    clean_pdf, noisy_pdf = mixture_density(mixture, grid)
    clean_mean = float(mixture.means()[mixture.clean_component()])
    return LossView(edges, density, grid, clean_pdf, noisy_pdf, float(mixture.noisy_weight()), clean_mean)


def loss_diagnostics(config: CleanConfig, manifest: dict[str, Any]) -> LossDiagnostics | None:
    """The fitted mixtures over a loss sample, or None without a checkpoint (a distributed finalize)."""
    checkpoint = checkpoint_dir(config, manifest)
    paths = [p for p in (embedding_path(config.output, i["url"]) for i in manifest.get("inputs", [])) if _exists(p)]
    if checkpoint is None or not paths:
        return None
    from bicro_clean.models.bicro import BiCroModel

    with local_checkpoint(checkpoint) as local:
        model = BiCroModel.load(local, device="cpu")  # CPU: the same bytes on every machine
    losses = sample_losses(model, paths, LOSS_SAMPLE, config.bicro.seed)
    if not losses or not len(losses[0]):
        return None
    views = [loss_view(m, x) for m, x in zip(model.mixtures, losses)]
    return LossDiagnostics(views, len(losses[0]), str(model.params.division))


# ================================================================ thumbnails


@dataclass(frozen=True)
class Thumb:
    uri: str | None  # data URI, None when the image cannot be shown
    caption: str


def shard_urls(manifest: dict[str, Any], picks: dict[str, list[dict[str, Any]]]) -> dict[str, set[str]]:
    """Shard URL -> keys to fetch: every gallery row and its two nearest anchors."""
    by_id = shards_by_id(manifest)
    wanted: dict[str, set[str]] = {}
    for row in (r for rows in picks.values() for r in rows):
        wanted.setdefault(row["shard"], set()).add(row["key"])
        for anchor in (row.get("anchor_key_i2t"), row.get("anchor_key_t2i")):
            sid, key = split_pair_key(anchor) if anchor else (None, None)
            if sid in by_id:
                wanted.setdefault(by_id[sid], set()).add(key)
    return wanted


def thumbnail_uri(data: bytes, max_pixels: int, size: int = THUMB_PX) -> str | None:
    """A small JPEG re-encode for the report only (the cleaned shards keep the original bytes)."""
    try:
        with Image.open(io.BytesIO(data), formats=SAFE_IMAGE_FORMATS) as image:
            if image.width * image.height > max_pixels:
                return None
            image.draft("RGB", (size * 2, size * 2))  # JPEG: decode at reduced scale, far less memory
            small = image.convert("RGB")
            small.thumbnail((size, size), Image.Resampling.LANCZOS)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        logger.debug("report: no thumbnail: %s", error)
        return None
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_thumb(sample: RawSample, max_pixels: int) -> Thumb:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
    uri = thumbnail_uri(sample.members[ext], max_pixels) if ext else None
    caption = sample.members.get("txt", b"").decode("utf-8", errors="replace").strip()
    return Thumb(uri, caption)


def fetch_thumbnails(wanted: dict[str, set[str]], config: CleanConfig) -> dict[tuple[str, str], Thumb]:
    """Stream each needed shard once, stopping as soon as its wanted keys are found."""
    found: dict[tuple[str, str], Thumb] = {}
    for url in sorted(wanted):
        missing = set(wanted[url])
        for item in iter_shard(url, config.reader):
            if isinstance(item, RawSample) and item.key in missing:
                found[(url, item.key)] = sample_thumb(item, config.reader.max_image_pixels)
                missing.discard(item.key)
            if not missing:
                break
        if missing:
            logger.warning("report: %d samples not found in %s", len(missing), url)
    return found


# ================================================================ SVG plots


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


def _n(value: float) -> str:
    """Pixel coordinates with one decimal: compact and identical across runs."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
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
        py = _n(frame.sy(y))
        out.append(f'<line x1="{frame.left}" x2="{frame.width - frame.right}" y1="{py}" y2="{py}" '
                   f'stroke="{GRID}"/><text x="{frame.left - 6}" y="{py}" dy="4" text-anchor="end" '
                   f'class="tick">{_tick_label(y)}</text>')
    base = _n(frame.height - frame.bottom)
    for x in nice_ticks(frame.x0, frame.x1, 5):
        out.append(f'<text x="{_n(frame.sx(x))}" y="{base}" dy="16" text-anchor="middle" '
                   f'class="tick">{_tick_label(x)}</text>')
    out.append(f'<line x1="{frame.left}" x2="{frame.width - frame.right}" y1="{base}" y2="{base}" stroke="#9aa5b1"/>')
    out.append(f'<text x="{_n((frame.left + frame.width - frame.right) / 2)}" y="{frame.height - 6}" '
               f'text-anchor="middle" class="label">{html.escape(xlabel)}</text>')
    out.append(f'<text transform="translate(13 {_n((frame.top + frame.height - frame.bottom) / 2)}) rotate(-90)" '
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
            out.append(f'<rect x="{_n(x + 0.5)}" y="{_n(top)}" width="{_n(max(frame.sx(hi) - x - 1, 0.5))}" '
                       f'height="{_n(frame.sy(b) - top)}" fill="{color}"/>')
    return out


def polyline(frame: Frame, xs: np.ndarray, ys: np.ndarray, color: str, width: float = 2.0,
             dash: str = "") -> str:
    points = " ".join(f"{_n(frame.sx(x))},{_n(frame.sy(min(y, frame.y1)))}" for x, y in zip(xs, ys))
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="{width}" '
            f'stroke-linejoin="round"{extra}/>')


def vline(frame: Frame, x: float, label: str, color: str = INK, low: bool = False) -> str:
    """Dashed marker with its label at the top (or, `low`, bottom-left, where a falling curve leaves room)."""
    px = _n(frame.sx(x))
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
        parts.append(f'<circle cx="{_n(frame.sx(rule.threshold))}" cy="{_n(frame.sy(kept_fraction))}" r="5" '
                     f'fill="#3b5bdb" stroke="#fff" stroke-width="2"/>')
    return svg(frame, parts, "kept fraction versus threshold")


# ================================================================ HTML


CSS = """
:root{--bg:#f4f6f9;--card:#fff;--ink:#1d2733;--muted:#6b7785;--line:#e3e7ed;--keep:#2b8a5e;--drop:#e0622a;
--err:#8a94a3;--accent:#3b5bdb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
-webkit-font-smoothing:antialiased}
main{max-width:1220px;margin:0 auto;padding:36px 28px 72px}
header{margin-bottom:26px}
h1{font-size:30px;letter-spacing:-.02em;margin:0 0 4px}
h2{font-size:20px;letter-spacing:-.01em;margin:40px 0 6px}
h3{font-size:15px;margin:0 0 8px}
p.lead,.sub{color:var(--muted);margin:0 0 16px}
code{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eef1f5;padding:1px 5px;
border-radius:4px}
.card{background:var(--card);border:1px solid var(--line);border-radius:14px;padding:18px 20px;
box-shadow:0 1px 3px rgba(16,24,40,.05)}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:14px}
.stat .k{color:var(--muted);font-size:13px;text-transform:uppercase;letter-spacing:.06em}
.stat .v{font-size:30px;font-weight:650;font-variant-numeric:tabular-nums;line-height:1.25}
.stat .s{color:var(--muted);font-size:13px}
.stat.keep{border-top:4px solid var(--keep)}.stat.drop{border-top:4px solid var(--drop)}
.stat.err{border-top:4px solid var(--err)}.stat.in{border-top:4px solid var(--accent)}
.stat.est{border-top:4px solid #7950f2}.stat.truth{border-top:4px solid #1098ad}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{padding:8px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.06em;font-weight:600}
td.n{text-align:right;white-space:nowrap}
.bar{height:8px;border-radius:4px;background:#eef1f5;min-width:90px}
.bar span{display:block;height:8px;border-radius:4px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px}
.plots.three{grid-template-columns:repeat(auto-fit,minmax(340px,1fr))}
svg.plot{width:100%;height:auto;display:block}
svg .tick{font-size:11px;fill:#6b7785}svg .label{font-size:12px;fill:#3e4c59}
svg .legend{font-size:12px;fill:#3e4c59}svg .note{font-size:12px;fill:#1d2733;font-weight:600}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
.pair{display:flex;flex-direction:column;gap:10px;padding:14px}
.top{display:flex;gap:14px}.top .body{flex:1;min-width:0}
dl.scores{display:grid;grid-template-columns:auto auto;gap:1px 10px;margin:8px 0 0;font-size:12px;
font-variant-numeric:tabular-nums}
dl.scores dt{color:var(--muted)}dl.scores dd{margin:0;font-weight:600;text-align:right}
.near{font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.06em;margin-bottom:-4px;
border-top:1px dashed var(--line);padding-top:9px}
.img{width:128px;height:128px;flex:none;border-radius:10px;background:#e9edf2;object-fit:contain}
.noimg{display:flex;align-items:center;justify-content:center;color:var(--muted);font-size:12px}
.cap{font-size:14px;line-height:1.4;margin:0 0 8px;display:-webkit-box;-webkit-line-clamp:4;
-webkit-box-orient:vertical;overflow:hidden}
.chips{display:flex;flex-wrap:wrap;gap:5px}
.chip{font-size:12px;padding:1px 8px;border-radius:999px;background:#eef1f5;color:#3e4c59;
font-variant-numeric:tabular-nums;white-space:nowrap}
.chip.keep{background:#e3f4ea;color:#1e6b47}.chip.drop{background:#fde9df;color:#a8431a}
.chip.t-clean{background:#e3f2f5;color:#0b7285}.chip.t-noisy{background:#fff0d9;color:#a15c07}
.anchors{display:grid;grid-template-columns:1fr 1fr;gap:10px}
.anchor{display:flex;gap:8px;align-items:flex-start;min-width:0}
.anchor .img{width:52px;height:52px;border-radius:7px}
.anchor .t{font-size:12px;color:var(--muted);line-height:1.35;min-width:0}
.anchor .t b{display:block;color:#3e4c59;font-weight:600;font-size:11px;text-transform:uppercase;
letter-spacing:.05em}
.anchor .t span{display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;overflow:hidden}
footer{margin-top:48px;color:var(--muted);font-size:12px}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def stat_card(kind: str, title: str, value: str, sub: str = "") -> str:
    return (f'<div class="card stat {kind}"><div class="k">{esc(title)}</div><div class="v">{esc(value)}</div>'
            f'<div class="s">{esc(sub)}</div></div>')


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%} of input" if whole else ""


def count_cards(counts: dict[str, Any]) -> list[str]:
    total = int(counts.get("in", 0))
    return [stat_card("in", "Input pairs", f"{total:,}", "samples read from the shards"),
            stat_card("keep", "Kept", f"{counts.get('kept', 0):,}", _share(counts.get("kept", 0), total)),
            stat_card("drop", "Dropped", f"{counts.get('dropped', 0):,}", _share(counts.get("dropped", 0), total)),
            stat_card("err", "Errors", f"{counts.get('errors', 0):,}", _share(counts.get("errors", 0), total))]


def estimate_cards(counts: dict[str, Any], stats: Stats, losses: LossDiagnostics | None) -> list[str]:
    kept_share = counts.get("kept", 0) / stats.scored if stats.scored else float("nan")
    cards = [stat_card("est", "Dropped share", f"{1 - kept_share:.1%}" if stats.scored else "n/a",
                       "1 − kept / scored pairs")]
    if losses is not None:
        per_net = ", ".join(f"{v.noisy_weight:.3f}" for v in losses.views)
        cards.insert(0, stat_card("est", "Estimated noise", f"{losses.noisy_weight:.1%}",
                                  f"mixture noisy weight (networks: {per_net})"))
    return cards + truth_cards(stats)


def truth_cards(stats: Stats) -> list[str]:
    truth = stats.truth
    if not truth["rows"]:
        return []
    auc = binned_auroc(stats.auc[True], stats.auc[False])
    cards = [stat_card("truth", "True noise rate", f"{truth['noisy'] / truth['rows']:.1%}",
                       f"{truth['noisy']:,} of {truth['rows']:,} pairs with truth_clean"),
             stat_card("truth", "AUROC soft_label", f"{auc:.3f}" if auc is not None else "n/a",
                       "ranking truly clean above truly noisy")]
    if truth["kept"]:
        cards.append(stat_card("truth", "Kept precision", f"{truth['kept_clean'] / truth['kept']:.1%}",
                               f"clean recall {truth['kept_clean'] / max(truth['clean_scored'], 1):.1%}"))
    return cards


def reason_text(code: str) -> str:
    if code in REASONS:
        return "Reader: " + REASONS[code]
    if code in SELECT_REASONS:
        return SELECT_REASONS[code]
    if code.startswith("low_"):
        return f"Dropped: {code[4:]} below select.threshold."
    return ""


def reason_table(counts: dict[str, Any]) -> str:
    by_reason = counts.get("by_reason", {})
    total = max(sum(by_reason.values()), 1)
    rows = []
    for code, n in sorted(by_reason.items(), key=lambda item: (-item[1], item[0])):
        color = "var(--keep)" if code == "kept" else "var(--err)" if code in REASONS else "var(--drop)"
        rows.append(f'<tr><td><code>{esc(code)}</code></td><td class="n">{n:,}</td><td class="n">{n / total:.1%}'
                    f'</td><td><div class="bar"><span style="width:{n / total:.1%};background:{color}"></span></div>'
                    f'</td><td>{esc(reason_text(code))}</td></tr>')
    head = "<tr><th>reason</th><th>pairs</th><th>share</th><th></th><th>meaning</th></tr>"
    return f'<div class="card"><table>{head}{"".join(rows)}</table></div>'


def plot_card(title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="sub">{note}</p>' if note else ""
    return f'<div class="card"><h3>{esc(title)}</h3>{note_html}{body}</div>'


def plots_section(config: CleanConfig, manifest: dict[str, Any], rule: Rule, stats: Stats,
                  losses: LossDiagnostics | None) -> str:
    counts = manifest.get("counts", {})
    kept_fraction = counts.get("kept", 0) / stats.scored if stats.scored else 0.0
    marker = (rule.threshold, f"threshold {rule.threshold:.3g}") if rule.column == "soft_label" else None
    clean = config.bicro.clean_threshold
    cards = [plot_card("soft_label", stacked_histogram(stats.soft, "soft_label", marker),
                       "BiCro's soft correspondence label of every scored pair."),
             plot_card("p_clean", stacked_histogram(stats.p_clean, "p_clean", (clean, f"clean_threshold {clean:g}")),
                       "Posterior of the clean mixture component, mean of the two networks."),
             plot_card("Kept fraction vs threshold", curve_plot(stats, rule, kept_fraction), curve_note(rule))]
    return (f'<div class="plots three">{"".join(cards)}</div><h2>Loss mixtures</h2>{mixture_lead(losses)}'
            f'<div class="plots">{"".join(mixture_cards(losses))}</div>')


def curve_note(rule: Rule) -> str:
    if rule.column == "soft_label":
        return "Share of scored pairs a soft_label threshold would keep; the dot is this run."
    return ("Share of scored pairs a soft_label threshold would keep "
            f"(this run selected on <code>{esc(rule.column)}</code>).")


def mixture_lead(losses: LossDiagnostics | None) -> str:
    if losses is None:
        return '<p class="lead">No checkpoint in the manifest: the fitted mixtures are not drawn.</p>'
    return (f'<p class="lead">Each network\'s {esc(losses.division.upper())} over its min-max normalised per-pair '
            f'loss (against the stored negative bank), on a seeded sample of {losses.sample:,} pairs. Low loss = '
            f'clean; p_clean is the green component\'s share.</p>')


def mixture_cards(losses: LossDiagnostics | None) -> list[str]:
    views = losses.views if losses is not None else []
    return [plot_card(f"Network {'AB'[k] if k < 2 else k}", mixture_plot(view, f"network {'AB'[k] if k < 2 else k}"),
                      f"Noisy weight {view.noisy_weight:.3f}; clean component mean {view.clean_mean:.3f}.")
            for k, view in enumerate(views)]


# ---------------------------------------------------------------- galleries


def image_tag(thumb: Thumb | None, alt: str, extra: str = "") -> str:
    if thumb is None or thumb.uri is None:
        return f'<div class="img noimg {extra}">no image</div>'
    return f'<img class="img {extra}" src="{thumb.uri}" alt="{esc(alt)}">'


def _chip(text: str, kind: str = "") -> str:
    return f'<span class="chip {kind}">{esc(text)}</span>'


def score_chips(row: dict[str, Any]) -> str:
    decision = row["decision"] if row["reason"] == "kept" else f"{row['decision']}: {row['reason']}"
    chips = [_chip(decision, row["decision"])]
    if row.get("truth_clean") is not None:
        clean = bool(row["truth_clean"])
        chips.append(_chip("truly clean" if clean else "truly noisy", "t-clean" if clean else "t-noisy"))
    return f'<div class="chips">{"".join(chips)}</div>'


def score_grid(row: dict[str, Any], rule: Rule) -> str:
    cells = []
    for column in dict.fromkeys(("soft_label", "p_clean", "consistency", "match_score", rule.column)):
        value = row.get(column)
        if isinstance(value, float) and not math.isnan(value):
            cells.append(f"<dt>{esc(column)}</dt><dd>{value:.3f}</dd>")
    return f'<dl class="scores">{"".join(cells)}</dl>'


def anchor_block(label: str, pair: str | None, by_id: dict[str, str],
                 thumbs: dict[tuple[str, str], Thumb]) -> str:
    sid, key = split_pair_key(pair) if pair else ("", "")
    thumb = thumbs.get((by_id.get(sid, ""), key))
    caption = thumb.caption if thumb else ("none" if not pair else f"{pair} (not found)")
    return (f'<div class="anchor">{image_tag(thumb, caption)}<div class="t"><b>{esc(label)}</b>'
            f'<span title="{esc(caption)}">{esc(caption)}</span></div></div>')


def pair_card(row: dict[str, Any], rule: Rule, by_id: dict[str, str],
              thumbs: dict[tuple[str, str], Thumb]) -> str:
    caption = row.get("caption") or ""
    anchors = (anchor_block("by image", row.get("anchor_key_i2t"), by_id, thumbs)
               + anchor_block("by text", row.get("anchor_key_t2i"), by_id, thumbs))
    return (f'<div class="card pair"><div class="top">{image_tag(thumbs.get((row["shard"], row["key"])), caption)}'
            f'<div class="body"><p class="cap" title="{esc(row["key"])}">{esc(caption)}</p>{score_chips(row)}'
            f'{score_grid(row, rule)}</div></div><div class="near">nearest clean anchors</div>'
            f'<div class="anchors">{anchors}</div></div>')


GALLERIES = (
    ("lowest", "Lowest soft_label", "The pairs BiCro trusts least: most should be mismatched."),
    ("borderline", "Borderline", "Scores nearest the selection threshold: where the rule is hardest to get right."),
    ("random_kept", "Random kept pairs", "A seeded random sample of what goes into the cleaned shards."),
)


def gallery_sections(picks: dict[str, list[dict[str, Any]]], rule: Rule, manifest: dict[str, Any],
                     thumbs: dict[tuple[str, str], Thumb]) -> str:
    by_id = shards_by_id(manifest)
    out = []
    for name, title, lead in GALLERIES:
        cards = "".join(pair_card(row, rule, by_id, thumbs) for row in picks.get(name, []))
        body = cards or '<div class="card"><p class="sub">No pairs.</p></div>'
        out.append(f'<section id="{name}"><h2>{esc(title)}</h2><p class="lead">{esc(lead)} Each pair shows the '
                   f'clean anchors nearest to its image and to its caption.</p><div class="gallery">{body}</div>'
                   f'</section>')
    return "".join(out)


# ---------------------------------------------------------------- page


def header(config: CleanConfig, manifest: dict[str, Any], rule: Rule) -> str:
    shards = len(manifest.get("inputs", []))
    how = (f"top {config.select.keep_fraction:g} by <code>{esc(rule.column)}</code> (cut at {rule.threshold:.4g})"
           if rule.by_fraction else f"<code>{esc(rule.column)}</code> ≥ {rule.threshold:g}")
    return (f'<header><h1>bicro-clean report</h1><p class="sub">{shards:,} input shard{"s" * (shards != 1)} · '
            f'encoder <code>{esc(config.embed.encoder)}</code> · {esc(config.bicro.division.upper())} division · '
            f'rule: {how}</p></header>')


def footer(manifest: dict[str, Any]) -> str:
    checkpoint = (manifest.get("checkpoint") or {}).get("sha256") or "?"
    return (f'<footer>package {esc(manifest.get("package_version"))} · config {esc(manifest.get("config_hash"))}'
            f' · checkpoint sha256 {esc(checkpoint[:16])}</footer>')


def render_page(config: CleanConfig, manifest: dict[str, Any], rule: Rule, stats: Stats,
                picks: dict[str, list[dict[str, Any]]], losses: LossDiagnostics | None,
                thumbs: dict[tuple[str, str], Thumb]) -> str:
    counts = manifest.get("counts", {})
    body = (header(config, manifest, rule)
            + f'<section id="counts"><div class="stats">{"".join(count_cards(counts))}</div>'
            + f'<h2>Noise</h2><div class="stats">{"".join(estimate_cards(counts, stats, losses))}</div></section>'
            + f'<section id="reasons"><h2>Decisions by reason</h2>{reason_table(counts)}</section>'
            + f'<section id="plots"><h2>Scores</h2>{plots_section(config, manifest, rule, stats, losses)}</section>'
            + gallery_sections(picks, rule, manifest, thumbs) + footer(manifest))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>bicro-clean report</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n')
