"""The threshold slider: a self-contained widget (inline JSON data + inline script, no network, no library).

Pick a score column and move the threshold: the kept count and fraction (precision and recall when truth_clean is
known) are read from the column's fine histogram (exact at its 1,000 bin edges), and the example pairs nearest
the threshold (a bounded, seeded sample per coarse bin, see threshold.py) are shown with their thumbnails.
Without truth, clean_score's sums per bin give the expected precision of the kept pairs and the expected clean
pairs lost (exact at the edges too), next to the run's one noise estimate and the commands that apply the
position: `bicro-clean run ... --threshold T` / `--keep-fraction F` and `bicro-clean select` (commands.py).

Untrusted text (captions, keys) only ever reaches the page as JSON inside a script element, with every <, > and &
written as a \\u escape, and is inserted with textContent, never as markup.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from bicro_clean.pipeline.report.commands import OUTPUT, Commands
from bicro_clean.pipeline.report.threshold import BINS, ScoreBins, example_rows
from bicro_clean.pipeline.report.thumbnails import Thumb, shown_uri

NEAREST = 8  # example pairs shown around the threshold
SUM_DIGITS = 6  # clean_score sums per bin in the page's data: 1e-6 each, far below what the readouts show


def script_json(data: Any) -> str:
    """JSON that is safe inside <script>: no '</script>', no '<!--', no entity surprises."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _number(value: Any) -> float | None:
    # Not rounded: the range ends (lo, hi) are exact values, and a rounded score could fall just below lo, so
    # the slider would call the lowest pair dropped at the threshold that keeps every pair
    return float(value) if isinstance(value, float) and math.isfinite(value) else None


def slider_data(bins: ScoreBins, rule_column: str, threshold: float, thumbs: dict[tuple[str, str], Thumb],
                commands: Commands | None = None, noise: float | None = None) -> dict[str, Any]:
    """The widget's data; `noise`: the run's noise estimate (buys.noise_estimate), shown at every position."""
    columns = []
    for c in bins.columns.values():
        truth = int(c.known.sum()) > 0 and int(c.clean.sum()) > 0
        estimated = int(c.estimated.sum()) > 0
        columns.append({"name": c.name, "lo": c.lo, "hi": c.hi, "bins": BINS, "total": c.total.tolist(),
                        "clean": c.clean.tolist() if truth else None, "known": c.known.tolist() if truth else None,
                        "sum": [round(float(v), SUM_DIGITS) for v in c.sums()] if estimated else None,
                        "estimated": c.estimated.tolist() if estimated else None})
    examples = []
    for row in example_rows(bins):
        thumb = thumbs.get((str(row["shard"]), str(row["key"])))
        truth = row.get("truth_clean")
        examples.append({"key": str(row["key"]), "caption": str(row.get("caption") or ""),
                         "img": shown_uri(thumb),
                         "truth": bool(truth) if truth is not None else None,
                         "scores": {c: _number(row.get(c)) for c in bins.columns}})
    return {"columns": columns, "examples": examples, "nearest": NEAREST, "noise": noise,
            "commands": commands.as_data() if commands is not None else None,
            "rule": {"column": rule_column, "threshold": float(threshold) if math.isfinite(threshold) else None}}


READOUTS = [("th-value", "threshold"), ("th-kept", "kept pairs"), ("th-frac", "kept fraction")]
EXPECTED_READOUTS = [("th-exp-precision", "expected precision"), ("th-exp-lost", "expected clean pairs lost"),
                     ("th-noise", "estimated noise")]
TRUTH_READOUTS = [("th-precision", "measured precision"), ("th-recall", "measured recall")]


def _readouts(pairs: list[tuple[str, str]]) -> str:
    return "".join(f'<div class="ro"><div class="k">{label}</div><div class="v" id="{i}">–</div>'
                   f'<div class="s" id="{i}-s"></div></div>' for i, label in pairs)


def _command_block(commands: Commands | None) -> str:
    if commands is None:
        return ""
    note = ""
    if commands.from_file:
        note = (f'<p class="sub">This run set {html.escape(", ".join(commands.from_file))} outside the '
                f'<code>bicro-clean run</code> flags: give the same settings in <code>CONFIG.yaml</code>, without '
                f'a <code>select:</code> section (the flags above set the rule).</p>')
    return (f'<div class="commands"><div class="near-title">this position as a command (a rerun with only another '
            f'rule reuses every score; <code>{OUTPUT}</code> is this run\'s output folder, the one holding this '
            f'report)</div><pre class="cmd" id="th-cmd-threshold"></pre>'
            f'<pre class="cmd" id="th-cmd-fraction"></pre><pre class="cmd" id="th-cmd-select"></pre>{note}</div>')


def slider_section(bins: ScoreBins, rule_column: str, threshold: float,
                   thumbs: dict[tuple[str, str], Thumb], commands: Commands | None = None,
                   noise: float | None = None) -> str:
    if not bins.columns:
        return '<div class="card"><p class="sub">No score columns in the annotated files.</p></div>'
    options = "".join(f'<option value="{i}">{html.escape(c)}</option>' for i, c in enumerate(bins.columns))
    readouts = READOUTS + (EXPECTED_READOUTS if noise is not None else [])
    cells = _readouts(readouts) + (_readouts(TRUTH_READOUTS) if bins.has_truth else "")
    data = script_json(slider_data(bins, rule_column, threshold, thumbs, commands, noise))
    return (f'<div class="card slider" id="slider"><div class="controls"><label>score column '
            f'<select id="th-column">{options}</select></label><input type="range" id="th-slider" min="0" '
            f'max="{BINS}" step="1" value="0" aria-label="threshold"></div><div class="readouts">{cells}</div>'
            f'<p class="sub" id="th-note"></p>{_command_block(commands)}'
            f'<div class="near-title">pairs nearest the threshold '
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
    if (c.sum) { c.sumKept = suffix(c.sum); c.estKept = suffix(c.estimated); }
  });
  function edge(c, k) { return c.lo + (c.hi - c.lo) * k / c.bins; }
  function nearestEdge(c, t) { if (t === null) { return c.bins / 2; } return Math.max(0, Math.min(c.bins, Math.round((t - c.lo) / (c.hi - c.lo) * c.bins))); }
  function pct(x) { return isFinite(x) ? (100 * x).toFixed(1) + "%" : "n/a"; }
  function num(x) { return Number(x.toPrecision(4)).toString(); }
  function count(x) { return Math.round(x).toLocaleString("en-US"); }
  // the shortest keep fraction F whose floor(F * n) keeps exactly `kept` pairs (select.n_to_keep's rule)
  function fraction(kept, n) {
    if (kept <= 0 || n <= 0) { return null; }
    for (var p = 1; p <= 17; p++) { var f = Number((kept / n).toPrecision(p)); if (f > 0 && f <= 1 && Math.floor(f * n + 1e-9) === kept) { return f.toString(); } }
    return (kept / n).toString();
  }
  function commands(c, t, kept) {
    var K = D.commands; if (!K) { return; }
    var T = Number(t.toPrecision(6)).toString(), F = fraction(kept, c.n);
    var col = c.name === "clean_score" ? "" : " --column " + c.name, selCol = c.name === D.rule.column ? "" : " --column " + c.name;
    set("th-cmd-threshold", K.run + col + " --threshold " + T + " --overwrite");
    set("th-cmd-fraction", F === null ? "(keeps no pair: no keep fraction)" : K.run + col + " --keep-fraction " + F + " --overwrite");
    set("th-cmd-select", F === null ? "" : K.select + selCol + " --keep-fraction " + F);
  }
  function expected(c, k) {
    if (D.noise === null) { return; }
    set("th-noise", pct(D.noise));
    set("th-noise-s", "1 − mean clean_score, all scored pairs");
    if (!c.sum) { set("th-exp-precision", "n/a"); set("th-exp-lost", "n/a"); return; }
    var totalSum = c.sumKept[0], lost = totalSum - c.sumKept[k];
    set("th-exp-precision", c.estKept[k] ? pct(c.sumKept[k] / c.estKept[k]) : "n/a");
    set("th-exp-precision-s", "mean clean_score of the kept pairs");
    set("th-exp-lost", count(lost));
    set("th-exp-lost-s", "sum of clean_score of the pairs below the threshold, of " + count(totalSum) + " expected clean");
  }
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
    expected(c, k);
    commands(c, t, c.kept[k]);
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
