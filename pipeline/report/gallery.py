"""The galleries: pair cards (image, caption, decision, truth where known, scores and the nearest clean anchors)
in sections ranked by the selection column or drawn at random (seeded), including, where truth_clean is known,
what the rule got wrong.
"""

from __future__ import annotations

import math
from typing import Any

from bicro_clean.pipeline.report.scan import Rule
from bicro_clean.pipeline.report.thumbnails import Thumb, shards_by_id, shown_uri, split_pair_key
from bicro_clean.pipeline.report.text import esc


def image_tag(thumb: Thumb | None, alt: str, extra: str = "") -> str:
    uri = shown_uri(thumb)
    if uri is None:
        return f'<div class="img noimg {extra}">no image</div>'
    return f'<img class="img {extra}" src="{esc(uri)}" alt="{esc(alt)}">'


def _chip(text: str, kind: str = "") -> str:
    return f'<span class="chip {kind}">{esc(text)}</span>'


def score_chips(row: dict[str, Any]) -> str:
    decision = row["decision"] if row["reason"] == "kept" else f"{row['decision']}: {row['reason']}"
    chips = [_chip(decision, row["decision"])]
    if row.get("truth_clean") is not None:
        clean = bool(row["truth_clean"])
        chips.append(_chip("truly clean" if clean else "truly noisy", "t-clean" if clean else "t-noisy"))
    return f'<div class="chips">{"".join(chips)}</div>'


def score_text(value: float) -> str:
    """Three decimals; tiny non-zero values (clean_score's confident noisy pairs) as 1.2e-05, not 0.000."""
    return f"{value:.1e}" if 0 < abs(value) < 5e-4 else f"{value:.3f}"


def score_grid(row: dict[str, Any], rule: Rule) -> str:
    cells = []
    for column in dict.fromkeys((rule.column, "soft_label", "p_clean", "consistency", "match_score")):
        value = row.get(column)
        if isinstance(value, float) and not math.isnan(value):
            cells.append(f"<dt>{esc(column)}</dt><dd>{score_text(value)}</dd>")
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


GALLERIES = (("lowest", "Lowest {column}"), ("borderline", "Borderline"), ("random_kept", "Random kept pairs"),
             ("random_dropped", "Random dropped pairs"), ("kept_noisy", "Kept but truly noisy"),
             ("dropped_clean", "Dropped but truly clean"))
TRUTH_GALLERIES = ("kept_noisy", "dropped_clean")  # shown only where truth_clean is known
LEADS = {
    "random_kept": "A seeded random sample of what goes into the cleaned shards: these should look right.",
    "random_dropped": ("A seeded random sample of what the rule takes out: if many of these look right, the "
                       "threshold is too strict."),
    "kept_noisy": ("A seeded random sample of the kept pairs whose truth_clean says mismatched: the noise the rule "
                   "lets through."),
    "dropped_clean": ("A seeded random sample of the dropped pairs whose truth_clean says clean: the good pairs the "
                      "rule loses."),
}
CARD_NOTE = ("Each card: the pair's image and caption, its decision (and the truth where known), its scores, and "
             "the clean anchors nearest to its image (by image) and to its caption (by text); consistency is high "
             "when those anchors agree with the pairing.")


def lowest_lead(rule: Rule) -> str:
    if rule.column == "soft_label":
        return ("The pairs BiCro trusts least (lowest soft_label, ties by p_clean, then a seeded random order): most "
                "should be mismatched. Many sit at exactly 0: pairs in the noisy set whose consistency is at most "
                "tau.")
    if rule.column == "clean_score":
        return ("The pairs with the lowest clean_score, the smallest estimated probability of being clean: most "
                "should be mismatched.")
    return (f"The pairs with the lowest {rule.column} (ties in a seeded random order): most should be "
            f"mismatched.")


def borderline_lead(rule: Rule) -> str:
    cut = "cutoff" if rule.by_fraction else "threshold"
    lead = (f"The pairs whose {rule.column} is nearest this run's {cut} {rule.threshold:.4g}: a small change of "
            f"threshold flips their decision, so this is where the rule is hardest to get right.")
    if rule.column == "clean_score":
        lead += (" clean_score is a calibrated probability that the pair is clean: the mean clean_score over a set "
                 "of pairs is the expected share of clean pairs in it. So these cards are the pairs nearest the "
                 f"{cut}, each clean with a probability of about {min(max(rule.threshold, 0.0), 1.0):.0%}: expect "
                 "a mix of right and wrong pairings here.")
    if rule.column == "soft_label":
        lead += (" How soft_label is built: anchors (the most confident clean pairs) get 1; other pairs the mixture "
                 "puts in its clean set (p_clean > clean_threshold) get 0.5 + consistency / 2; noisy-set pairs get "
                 "their consistency, or 0 when it is at most tau. A soft_label of exactly 0.500 is therefore a "
                 "clean-set pair with zero consistency: the loss says clean, its neighbours disagree. A rule of "
                 "soft_label ≥ 0.5 keeps them, which is why many borderline cards read 0.500.")
    return lead


def gallery_sections(picks: dict[str, list[dict[str, Any]]], rule: Rule, manifest: dict[str, Any],
                     thumbs: dict[tuple[str, str], Thumb], truth: bool) -> str:
    """Every gallery as a section; the two of the rule's mistakes only when `truth` (truth_clean is known)."""
    by_id = shards_by_id(manifest)
    out = []
    leads = {"lowest": lowest_lead(rule), "borderline": borderline_lead(rule), **LEADS}
    for name, title in GALLERIES:
        if name in TRUTH_GALLERIES and not truth:
            continue
        title, lead = title.format(column=rule.column), leads[name]
        cards = "".join(pair_card(row, rule, by_id, thumbs) for row in picks.get(name, []))
        body = cards or '<div class="card"><p class="sub">No pairs.</p></div>'
        out.append(f'<section id="{name}"><h2>{esc(title)}</h2><p class="lead">{esc(lead)} {esc(CARD_NOTE)}</p>'
                   f'<div class="gallery">{body}</div></section>')
    return "".join(out)
