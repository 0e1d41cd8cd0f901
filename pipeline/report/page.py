"""The HTML page: count and estimate cards, the reason table, the plot cards and the galleries, with the
stylesheet (report.css, shipped as package data) inlined.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.report.diagnostics import LossDiagnostics
from bicro_clean.pipeline.report.plots import mixture_plot, stacked_histogram, threshold_plot
from bicro_clean.pipeline.report.buys import flat_note, kept_precision, kinds_table, noise_card, noise_estimate
from bicro_clean.pipeline.report.commands import run_commands
from bicro_clean.pipeline.report.compare import Agreement, agreement
from bicro_clean.pipeline.report.scan import Rule, Stats
from bicro_clean.pipeline.report.slider import slider_section
from bicro_clean.pipeline.report.gallery import gallery_sections
from bicro_clean.pipeline.report.text import esc, stat_card
from bicro_clean.pipeline.report.thumbnails import Thumb
from bicro_clean.pipeline.shards import REASONS

# Package data (pyproject.toml ships *.css in wheels); inlined so the page needs no second file.
CSS = files(__package__).joinpath("report.css").read_text(encoding="utf-8")
# Drop reasons follow one rule: low_<column> (below select.threshold, see reason_text) or below_keep_fraction
SELECT_REASONS = {
    "kept": "Kept: the score passed the selection rule.",
    "below_keep_fraction": "Dropped: ranked below the select.keep_fraction cutoff.",
}


# No network at all: inline styles and scripts, data: images only. Untrusted text is escaped everywhere; the
# policy is a second wall behind that: no event-handler attributes (script-src-attr), no javascript: URLs and no
# HTML-parsing sinks (Trusted Types, which the report's script does not use), no <base> or form targets.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "script-src-attr 'none'; require-trusted-types-for 'script'; base-uri 'none'; form-action 'none'")


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%} of input" if whole else ""


def count_cards(counts: dict[str, Any]) -> list[str]:
    total = int(counts.get("in", 0))
    return [stat_card("in", "Input pairs", f"{total:,}", "samples read from the shards"),
            stat_card("keep", "Kept", f"{counts.get('kept', 0):,}", _share(counts.get("kept", 0), total)),
            stat_card("drop", "Dropped", f"{counts.get('dropped', 0):,}", _share(counts.get("dropped", 0), total)),
            stat_card("err", "Errors", f"{counts.get('errors', 0):,}", _share(counts.get("errors", 0), total))]


def estimate_cards(manifest: dict[str, Any], stats: Stats, rule: Rule, noise: float | None) -> list[str]:
    """The run's one noise estimate (buys.py), the share it dropped and the expected precision of what it kept."""
    counts = manifest.get("counts", {})
    kept_share = counts.get("kept", 0) / stats.scored if stats.scored else float("nan")
    cards = noise_card(noise, stats.bins) + [stat_card("est", "Dropped share", f"{1 - kept_share:.1%}" if stats.scored
                                                else "n/a", "1 − kept / scored pairs")]
    precision = kept_precision(manifest, *stats.kept_clean_score)
    if precision is not None:  # clean_score is calibrated: its mean over the kept pairs is their expected clean share
        cards.append(stat_card("est", "Expected kept precision", f"{precision:.1%}",
                               "mean clean_score of the kept pairs"))
    return cards + truth_cards(stats, rule)


def truth_cards(stats: Stats, rule: Rule) -> list[str]:
    truth = stats.truth
    if not truth["rows"]:
        return []
    auc = stats.auroc(rule.column)
    cards = [stat_card("truth", "True noise rate", f"{truth['noisy'] / truth['rows']:.1%}",
                       f"{truth['noisy']:,} of {truth['rows']:,} pairs with truth_clean"),
             stat_card("truth", f"AUROC {rule.column}", f"{auc:.3f}" if auc is not None else "n/a",
                       "ranking truly clean above truly noisy")]
    if truth["kept"]:
        cards.append(stat_card("truth", "Kept precision", f"{truth['kept_clean'] / truth['kept']:.1%}",
                               f"clean recall {truth['kept_clean'] / max(truth['clean_scored'], 1):.1%}"))
    return cards


# ---------------------------------------------------------------- clean_score next to encoder_cosine


COMPARE_NOTES = {"clean_score": "BiCro's calibrated P(clean)",
                 "encoder_cosine": "the aligned encoder's own image-text cosine"}


def _figure(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "n/a"


def compare_section(counts: dict[str, Any], stats: Stats) -> str:
    """With an aligned encoder (open_clip), is clean_score better than the encoder's own cosine? AUROCs when
    truth is known, otherwise how far the two agree. Nothing when encoder_cosine is all null (not aligned)."""
    if not stats.aligned:
        return ""
    if stats.truth["rows"]:
        rows = "".join(f'<tr><td><code>{esc(c)}</code></td><td class="n">{_figure(stats.auroc(c), ".3f")}</td>'
                       f'<td>{esc(COMPARE_NOTES[c])}</td></tr>' for c in COMPARE_NOTES)
        body = (f'<p class="sub">AUROC on the {stats.truth["rows"]:,} pairs with truth_clean: how often each score '
                f'ranks a truly clean pair above a truly noisy one (0.5 is chance).</p><table><tr><th>score</th>'
                f'<th>AUROC</th><th></th></tr>{rows}</table>')
    else:
        body = agreement_table(agreement(stats.pairs, counts.get("kept", 0) / max(stats.scored, 1)))
    return (f'<div class="card compare" id="compare"><h3>clean_score next to encoder_cosine</h3>{body}</div>')


def agreement_table(found: Agreement | None) -> str:
    if found is None:
        return '<p class="sub">No pair has both scores.</p>'
    scope = (f"all {found.pairs:,} scored pairs" if found.sample == found.pairs
             else f"a seeded sample of {found.sample:,} of the {found.pairs:,} scored pairs")
    rows = (f'<tr><td>Spearman rank correlation</td><td class="n">{_figure(found.spearman, ".3f")}</td>'
            f'<td>1: the same order; 0: unrelated</td></tr>'
            f'<tr><td>kept-set overlap</td><td class="n">{_figure(found.overlap, ".1%")}</td>'
            f'<td>share of the top {found.k:,} by clean_score also in the top {found.k:,} by encoder_cosine '
            f'(the run\'s kept share, {found.kept_share:.1%}; two unrelated rankings overlap by that much)</td></tr>')
    return (f'<p class="sub">No truth_clean to score them against: how far the two rankings agree, on {scope}.</p>'
            f'<table><tr><th>agreement</th><th>value</th><th></th></tr>{rows}</table>')


def reason_text(code: str) -> str:
    """The meaning of a reason code; an unknown code (a newer or older pipeline's) gets none but still its row."""
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


def plots_section(config: CleanConfig, rule: Rule, stats: Stats, losses: LossDiagnostics | None) -> str:
    cut = "cutoff" if rule.by_fraction else "threshold"
    marker = (rule.threshold, f"{cut} {rule.threshold:.3g}")
    clean = config.bicro.clean_threshold
    cards = [plot_card(rule.column, stacked_histogram(stats.main, rule.column, marker, rule.span),
                       f"The selection column of every scored pair. {COLUMN_NOTES.get(rule.column, '')}"),
             plot_card("p_clean", stacked_histogram(stats.p_clean, "p_clean", (clean, f"clean_threshold {clean:g}")),
                       "Posterior of the clean mixture component, mean of the two networks; BiCro's clean set "
                       "(p_clean > clean_threshold) is where its soft_label starts at 0.5.")]
    return (f'<div class="plots">{"".join(cards)}</div><h2>Loss mixtures</h2>{mixture_lead(losses)}'
            f'<div class="plots">{"".join(mixture_cards(losses))}</div>')


COLUMN_NOTES = {
    "clean_score": "Calibrated estimate of P(pair is clean), without ties: the default selection column.",
    "soft_label": "BiCro's soft correspondence label, its training label.",
    "p_clean": "Posterior of the clean loss component, mean of the two networks.",
    "consistency": "Bidirectional similarity consistency with the nearest clean anchors.",
    "match_score": "The matcher heads' image-text similarity.",
    "encoder_cosine": "Cosine of the frozen encoder's image and text embeddings.",
}


EXPECTED_TEXT = ("Without labels, clean_score (a calibrated probability that a pair is clean) says what a threshold "
                 "buys: the expected precision of the kept pairs is their mean clean_score (the curves' dotted "
                 "<i>expected</i> line), and the expected clean pairs lost is the sum of clean_score over the pairs "
                 "it drops. ")


def threshold_section(config: CleanConfig, rule: Rule, stats: Stats, thumbs: dict[tuple[str, str], Thumb],
                      noise: float | None) -> str:
    bins = stats.bins
    truth = ("Measured precision = share of the kept pairs that are truly clean; recall = share of the truly clean "
             "pairs that are kept (from the <code>truth_clean</code> column, as benchmark shards carry); the curves "
             "set the measured precision next to the expected one. "
             if bins.has_truth else "No <code>truth_clean</code> column: nothing is measured, only expected. ")
    lead = (f'<p class="lead">A threshold <i>t</i> on one score column keeps the scored pairs with score ≥ <i>t</i>. '
            f'{EXPECTED_TEXT if noise is not None else ""}{truth}Move the slider to see the count it '
            f'keeps, what it is expected to buy, the command that applies it and the pairs right at the cut; the '
            f'curves show the same for every column. The slider starts on this run\'s column, '
            f'<code>{esc(rule.column)}</code>, at its {"cutoff" if rule.by_fraction else "threshold"}.</p>')
    cards = [plot_card(name, threshold_plot(column, rule), COLUMN_NOTES.get(name, ""))
             for name, column in bins.columns.items()]
    commands = run_commands(config, rule.by_fraction)
    return (f'{lead}{flat_note(bins)}{slider_section(bins, rule.column, rule.threshold, thumbs, commands, noise)}'
            f'<div class="plots three">{"".join(cards)}</div>{kinds_table(stats)}')


MAX_SHARD_ROWS = 500  # beyond this, the shards with the highest dropped + error share


def shard_table(stats: Stats) -> str:
    items = sorted(stats.shards.items())
    note = ""
    if len(items) > MAX_SHARD_ROWS:
        worst = sorted(items, key=lambda kv: (-(kv[1]["dropped"] + kv[1]["errors"]) / max(kv[1]["in"], 1), kv[0]))
        items = sorted(worst[:MAX_SHARD_ROWS])
        note = (f'<p class="sub">{len(stats.shards):,} shards: the {MAX_SHARD_ROWS} with the highest dropped + '
                f'error share are listed (every shard\'s counts are in <code>results/&lt;shard&gt;.json</code>).</p>')
    rows = []
    for sid, c in items:
        total = max(c["in"], 1)
        reasons = ", ".join(f"<code>{esc(code)}</code> {n:,}" for code, n in c["reasons"]) or "–"
        rows.append(f'<tr><td><code>{esc(sid)}</code></td><td class="n">{c["in"]:,}</td><td class="n">{c["kept"]:,}'
                    f'</td><td class="n">{c["dropped"]:,}</td><td class="n">{c["errors"]:,}</td><td><div class="bar">'
                    f'<span style="width:{c["kept"] / total:.1%};background:var(--keep)"></span></div></td>'
                    f'<td>{reasons}</td></tr>')
    head = ("<tr><th>shard</th><th>in</th><th>kept</th><th>dropped</th><th>errors</th><th>kept share</th>"
            "<th>top reasons (not kept)</th></tr>")
    return f'<div class="card">{note}<div class="scroll"><table>{head}{"".join(rows)}</table></div></div>'


def mixture_lead(losses: LossDiagnostics | None) -> str:
    if losses is None:
        return '<p class="lead">No checkpoint in the manifest: the fitted mixtures are not drawn.</p>'
    return (f'<p class="lead">Each network\'s {esc(losses.division.upper())} over its min-max normalised per-pair '
            f'loss (against the stored negative bank), on a seeded sample of {losses.sample:,} pairs. Low loss = '
            f'clean; p_clean is the green component\'s share. A component\'s weight is a parameter of this fit, '
            f'not an estimate of the crawl\'s noise (that is 1 − mean clean_score, under Noise).</p>')


def mixture_cards(losses: LossDiagnostics | None) -> list[str]:
    views = losses.views if losses is not None else []
    return [plot_card(f"Network {'AB'[k] if k < 2 else k}", mixture_plot(view, f"network {'AB'[k] if k < 2 else k}"),
                      f"Noisy weight {view.noisy_weight:.3f}; clean component mean {view.clean_mean:.3f}.")
            for k, view in enumerate(views)]


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
    counts, noise = manifest.get("counts", {}), noise_estimate(manifest, stats.bins)
    body = (header(config, manifest, rule)
            + f'<section id="counts"><div class="stats">{"".join(count_cards(counts))}</div>'
            + f'<h2>Noise</h2><div class="stats">{"".join(estimate_cards(manifest, stats, rule, noise))}</div>'
            + f'{compare_section(counts, stats)}</section>'
            + f'<section id="reasons"><h2>Decisions by reason</h2>{reason_table(counts)}</section>'
            + f'<section id="threshold"><h2>Choosing a threshold</h2>'
            + f'{threshold_section(config, rule, stats, thumbs, noise)}</section>'
            + f'<section id="plots"><h2>Scores</h2>{plots_section(config, rule, stats, losses)}</section>'
            + f'<section id="shards"><h2>Per shard</h2>{shard_table(stats)}</section>'
            + gallery_sections(picks, rule, manifest, thumbs, stats.truth["rows"] > 0) + footer(manifest))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<title>bicro-clean report</title><style>\n{CSS}</style></head>'
            f'<body><main>{body}</main></body></html>\n')
