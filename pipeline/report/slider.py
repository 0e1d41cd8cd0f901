"""The threshold slider: a self-contained widget (inline JSON data + inline script, no network, no library).

Pick a score column and move the threshold: the kept count and fraction (precision and recall when truth_clean is
known) are read from the column's fine histogram (exact at its 1,000 bin edges), and the example pairs nearest
the threshold (a bounded, seeded sample per coarse bin, see threshold.py) are shown with their thumbnails.

Untrusted text (captions, keys) only ever reaches the page as JSON inside a script element, with every <, > and &
written as a \\u escape, and is inserted with textContent, never as markup.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from bicro_clean.pipeline.report.threshold import BINS, ScoreBins, example_rows
from bicro_clean.pipeline.report.thumbnails import Thumb, shown_uri

NEAREST = 8  # example pairs shown around the threshold


def script_json(data: Any) -> str:
    """JSON that is safe inside <script>: no '</script>', no '<!--', no entity surprises."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _number(value: Any) -> float | None:
    # Not rounded: the range ends (lo, hi) are exact values, and a rounded score could fall just below lo, so
    # the slider would call the lowest pair dropped at the threshold that keeps every pair
    return float(value) if isinstance(value, float) and math.isfinite(value) else None


def slider_data(bins: ScoreBins, rule_column: str, threshold: float,
                thumbs: dict[tuple[str, str], Thumb]) -> dict[str, Any]:
    columns = []
    for c in bins.columns.values():
        truth = int(c.known.sum()) > 0 and int(c.clean.sum()) > 0
        columns.append({"name": c.name, "lo": c.lo, "hi": c.hi, "bins": BINS, "total": c.total.tolist(),
                        "clean": c.clean.tolist() if truth else None, "known": c.known.tolist() if truth else None})
    examples = []
    for row in example_rows(bins):
        thumb = thumbs.get((str(row["shard"]), str(row["key"])))
        truth = row.get("truth_clean")
        examples.append({"key": str(row["key"]), "caption": str(row.get("caption") or ""),
                         "img": shown_uri(thumb),
                         "truth": bool(truth) if truth is not None else None,
                         "scores": {c: _number(row.get(c)) for c in bins.columns}})
    return {"columns": columns, "examples": examples, "nearest": NEAREST,
            "rule": {"column": rule_column, "threshold": float(threshold) if math.isfinite(threshold) else None}}


def slider_section(bins: ScoreBins, rule_column: str, threshold: float,
                   thumbs: dict[tuple[str, str], Thumb]) -> str:
    if not bins.columns:
        return '<div class="card"><p class="sub">No score columns in the annotated files.</p></div>'
    options = "".join(f'<option value="{i}">{html.escape(c)}</option>' for i, c in enumerate(bins.columns))
    truth = bins.has_truth
    readouts = [("th-value", "threshold"), ("th-kept", "kept pairs"), ("th-frac", "kept fraction")]
    if truth:
        readouts += [("th-precision", "precision"), ("th-recall", "recall")]
    cells = "".join(f'<div class="ro"><div class="k">{label}</div><div class="v" id="{i}">–</div>'
                    f'<div class="s" id="{i}-s"></div></div>' for i, label in readouts)
    data = script_json(slider_data(bins, rule_column, threshold, thumbs))
    return (f'<div class="card slider" id="slider"><div class="controls"><label>score column '
            f'<select id="th-column">{options}</select></label><input type="range" id="th-slider" min="0" '
            f'max="{BINS}" step="1" value="0" aria-label="threshold"></div><div class="readouts">{cells}</div>'
            f'<p class="sub" id="th-note"></p><div class="near-title">pairs nearest the threshold '
            f'(from a seeded sample of the run; ▲ kept, ▼ dropped at this threshold)</div>'
            f'<div class="th-examples" id="th-examples"></div></div>'
            f'<script type="application/json" id="threshold-data">{data}</script><script>{SCRIPT}</script>')


SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("threshold-data").textContent);
  var select = document.getElementById("th-column"), range = document.getElementById("th-slider");
  function suffix(a) { var s = new Array(a.length), t = 0; for (var i = a.length - 1; i >= 0; i--) { t += a[i]; s[i] = t; } return s; }
  D.columns.forEach(function (c) {
    c.kept = suffix(c.total); c.n = c.kept[0];
    if (c.clean) { c.cleanKept = suffix(c.clean); c.knownKept = suffix(c.known); c.nClean = c.cleanKept[0]; }
  });
  function edge(c, k) { return c.lo + (c.hi - c.lo) * k / c.bins; }
  function nearestEdge(c, t) { if (t === null) { return c.bins / 2; } return Math.max(0, Math.min(c.bins, Math.round((t - c.lo) / (c.hi - c.lo) * c.bins))); }
  function pct(x) { return isFinite(x) ? (100 * x).toFixed(1) + "%" : "n/a"; }
  function num(x) { return Number(x.toPrecision(4)).toString(); }
  function set(id, text) { var el = document.getElementById(id); if (el) { el.textContent = text; } }
  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) { e.className = cls; } if (text !== undefined) { e.textContent = text; } return e; }
  function card(x, c, t) {
    var v = x.scores[c.name], kept = v >= t, box = el("div", "th-pair " + (kept ? "keep" : "drop"));
    if (x.img) { var img = el("img", "img"); img.src = x.img; img.alt = x.caption; box.appendChild(img); }
    else { box.appendChild(el("div", "img noimg", "no image")); }
    var body = el("div", "body");
    body.appendChild(el("p", "cap", x.caption));
    var chips = el("div", "chips");
    chips.appendChild(el("span", "chip " + (kept ? "keep" : "drop"), (kept ? "▲ " : "▼ ") + c.name + " " + (v !== 0 && Math.abs(v) < 5e-4 ? v.toExponential(1) : v.toFixed(3))));
    if (x.truth !== null) { chips.appendChild(el("span", "chip " + (x.truth ? "t-clean" : "t-noisy"), x.truth ? "truly clean" : "truly noisy")); }
    body.appendChild(chips);
    body.appendChild(el("div", "key", x.key));
    box.appendChild(body);
    return box;
  }
  function update() {
    var c = D.columns[select.selectedIndex], k = +range.value, t = edge(c, k);
    set("th-value", num(t));
    set("th-kept", c.kept[k].toLocaleString("en-US"));
    set("th-kept-s", "of " + c.n.toLocaleString("en-US") + " scored pairs");
    set("th-frac", pct(c.kept[k] / Math.max(c.n, 1)));
    if (c.clean) {
      set("th-precision", c.knownKept[k] ? pct(c.cleanKept[k] / c.knownKept[k]) : "n/a");
      set("th-recall", pct(c.cleanKept[k] / Math.max(c.nClean, 1)));
    }
    set("th-note", c.name === D.rule.column ? "This run selected on " + c.name + " at " + (D.rule.threshold === null ? "?" : num(D.rule.threshold)) + "." :
        "What-if: a threshold on " + c.name + " instead (this run selected on " + D.rule.column + ").");
    var near = D.examples.filter(function (x) { return x.scores[c.name] !== null; });
    near.sort(function (a, b) { return Math.abs(a.scores[c.name] - t) - Math.abs(b.scores[c.name] - t) || (a.key < b.key ? -1 : 1); });
    // half just kept, half just dropped (the other side fills in when one runs short)
    var above = near.filter(function (x) { return x.scores[c.name] >= t; }), below = near.filter(function (x) { return x.scores[c.name] < t; });
    var half = D.nearest / 2, nAbove = Math.min(above.length, Math.max(half, D.nearest - below.length));
    near = above.slice(0, nAbove).concat(below.slice(0, D.nearest - nAbove));
    near.sort(function (a, b) { return b.scores[c.name] - a.scores[c.name]; });
    var box = document.getElementById("th-examples");
    while (box.firstChild) { box.removeChild(box.firstChild); }
    near.forEach(function (x) { box.appendChild(card(x, c, t)); });
  }
  select.addEventListener("change", function () {
    var c = D.columns[select.selectedIndex];
    range.value = c.name === D.rule.column ? nearestEdge(c, D.rule.threshold) : nearestEdge(c, edge(c, c.bins / 2));
    update();
  });
  range.addEventListener("input", update);
  range.addEventListener("change", update);
  var start = 0;
  D.columns.forEach(function (c, i) { if (c.name === D.rule.column) { start = i; } });
  select.selectedIndex = start;
  var c0 = D.columns[start];
  range.value = c0.name === D.rule.column ? nearestEdge(c0, D.rule.threshold) : c0.bins / 2;
  update();
})();
"""
