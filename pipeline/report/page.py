"""The HTML page: count and estimate cards, the reason table, the plot cards and the galleries, with the
stylesheet (report.css, shipped as package data) inlined.
"""

from __future__ import annotations

import html
import math
from importlib.resources import files
from typing import Any

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.report.diagnostics import LossDiagnostics
from bicro_clean.pipeline.report.plots import curve_plot, mixture_plot, stacked_histogram
from bicro_clean.pipeline.report.scan import Rule, Stats, binned_auroc
from bicro_clean.pipeline.report.thumbnails import Thumb, shards_by_id, split_pair_key
from bicro_clean.pipeline.shards import REASONS

# Package data (pyproject.toml ships *.css in wheels); inlined so the page needs no second file.
CSS = files(__package__).joinpath("report.css").read_text(encoding="utf-8")
SELECT_REASONS = {
    "kept": "Kept: the score passed the selection rule.",
    "noisy_division": "Dropped: the mixture put the pair in its noisy set (p_clean <= bicro.clean_threshold).",
    "below_keep_fraction": "Dropped: ranked below the select.keep_fraction cutoff.",
}


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
            f'<title>bicro-clean report</title><style>\n{CSS}</style></head>'
            f'<body><main>{body}</main></body></html>\n')
