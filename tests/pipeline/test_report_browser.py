"""The report's threshold slider in a real browser: headless Chromium opens report.html (file://, no network),
a small inline script moves the slider and changes the column the way a user does (set the value, dispatch the
input / change event), and the dumped DOM shows the readouts and the nearest pairs updated.

Skipped when no chromium binary is installed (apt-get install -y chromium).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from report_fixture import build_run, dump_dom, slider_data

pytestmark = pytest.mark.slow  # two small runs' reports plus three browser starts: ~15 s on 2 cores


# Runs after the report's own script: record the readouts, move the slider to the top and to the bottom, switch
# the column to p_clean, then back to the run's column (clean_score), recording each time. The results land in
# a <pre> that --dump-dom prints.
PROBE = """<script>
(function () {
  function read() {
    var out = {};
    ["th-value", "th-kept", "th-frac", "th-precision", "th-recall"].forEach(function (id) {
      out[id] = document.getElementById(id).textContent;
    });
    out.pairs = document.querySelectorAll("#th-examples .th-pair").length;
    out.kept_pairs = document.querySelectorAll("#th-examples .th-pair.keep").length;
    out.column = document.getElementById("th-column").selectedOptions[0].textContent;
    return out;
  }
  var range = document.getElementById("th-slider"), select = document.getElementById("th-column");
  var log = {before: read()};
  range.value = range.max;
  range.dispatchEvent(new Event("input", {bubbles: true}));
  log.top = read();
  range.value = range.min;
  range.dispatchEvent(new Event("input", {bubbles: true}));
  log.bottom = read();
  for (var i = 0; i < select.options.length; i++) { if (select.options[i].textContent === "p_clean") { select.selectedIndex = i; } }
  select.dispatchEvent(new Event("change", {bubbles: true}));
  log.p_clean = read();
  select.selectedIndex = 0;
  select.dispatchEvent(new Event("change", {bubbles: true}));
  log.back = read();
  log.note = document.getElementById("th-note").textContent;
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(log);
  document.body.appendChild(pre);
})();
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A small run's report (report_fixture: 25% caption noise, truth_clean known, aligned encoder, top half by
    clean_score kept), captions carrying markup."""
    return build_run(tmp_path_factory.mktemp("run")) / "report.html"


def _probe(report: Path, tmp_path: Path, probe: str = PROBE) -> dict:
    """The report with `probe` appended, opened in the browser: the probe's log."""
    page = report.read_text(encoding="utf-8")
    assert page.count("</body>") == 1
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    # The report's own CSP allows inline scripts only, so the probe runs like the report's script does.
    dom = dump_dom(probed, tmp_path / "profile")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe script did not run: " + dom[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">"))


def _kept_at(column: dict, threshold: float) -> int:
    """Pairs the slider data says a threshold at the bin edge nearest `threshold` keeps (the script's rule)."""
    k = max(0, min(column["bins"], round((threshold - column["lo"]) / (column["hi"] - column["lo"]) * column["bins"])))
    return sum(column["total"][k:])


def test_slider_moves_update_the_kept_count(report, tmp_path):
    log = _probe(report, tmp_path)

    def kept(state: dict) -> int:
        return int(state["th-kept"].replace(",", ""))

    before, top, bottom = log["before"], log["top"], log["bottom"]
    data = slider_data(report.read_text(encoding="utf-8"))
    column = data["columns"][0]
    # the slider opens on the run's column at the run's cutoff: it keeps what the run kept (up to one bin)
    assert before["column"] == column["name"] == "clean_score" and before["pairs"] > 0
    assert kept(before) == _kept_at(column, data["rule"]["threshold"])
    step = (column["hi"] - column["lo"]) / column["bins"]
    assert abs(float(before["th-value"]) - data["rule"]["threshold"]) <= step
    assert kept(bottom) > kept(before) > kept(top)  # moving the slider changes the kept count, monotonically
    assert bottom["th-frac"] == "100.0%" and top["th-value"] != before["th-value"]
    assert before["th-precision"].endswith("%") and bottom["th-recall"] == "100.0%"  # truth_clean is known
    assert top["kept_pairs"] < top["pairs"] and bottom["kept_pairs"] == bottom["pairs"]
    assert log["p_clean"]["column"] == "p_clean" and log["p_clean"]["th-value"] != bottom["th-value"]
    assert log["back"] == before  # back on clean_score: at the run's cutoff again
    assert log["note"].startswith("This run selected on clean_score at ")


def test_plain_report_runs_its_script_without_errors(report, tmp_path):
    dom = dump_dom(report, tmp_path / "profile")
    kept = re.search(r'id="th-kept">([^<]*)<', dom)
    assert kept and re.fullmatch(r"[\d,]+", kept.group(1))  # filled in by the script on load
    assert len(re.findall(r'class="th-pair (keep|drop)"', dom)) > 0
    assert "<b>&" not in dom and "colour" in dom  # captions inserted as text, never as markup


# ---------------------------------------------------------------- what a threshold buys, without labels

# Moves the clean_score slider to each position in POSITIONS (bin edges: threshold = position / 1000 on
# clean_score's [0, 1] bins) and records every readout of what that threshold buys, and its commands.
BUYS_PROBE = """<script>
(function () {
  var range = document.getElementById("th-slider"), select = document.getElementById("th-column");
  select.selectedIndex = 0;
  select.dispatchEvent(new Event("change", {bubbles: true}));
  var log = {column: select.selectedOptions[0].textContent, positions: []};
  POSITIONS.forEach(function (k) {
    range.value = k;
    range.dispatchEvent(new Event("input", {bubbles: true}));
    var out = {k: k};
    ["th-value", "th-kept", "th-exp-precision", "th-exp-lost", "th-noise", "th-cmd-threshold", "th-cmd-fraction",
     "th-cmd-select"].forEach(function (id) { out[id] = document.getElementById(id).textContent; });
    log.positions.push(out);
  });
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(log);
  document.body.appendChild(pre);
})();
</script>"""
POSITIONS = [0, 150, 200, 420, 500, 731, 900, 1000]


@pytest.fixture(scope="module")
def blind_report(tmp_path_factory) -> Path:
    """A run without truth_clean (nothing measured), clean_score >= 0.5 kept, 96 pairs plus a reader error."""
    from report_fixture import Options

    return build_run(tmp_path_factory.mktemp("blind"), Options(truth=False, keep_fraction=None, images=48,
                                                               seed=3)) / "report.html"


def _numbers(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


@pytest.mark.parametrize("which", ["blind_report", "report"])
def test_slider_readouts_match_the_annotated_files(which, request, tmp_path):
    """At several slider positions the expected precision (mean clean_score of the pairs kept), the expected clean
    pairs lost (sum of clean_score below the threshold), the noise estimate (1 - mean clean_score) and the commands
    agree with the same figures computed from the annotated Parquet files with polars. Slider positions are bin
    edges, where the page's sums are exact: the tolerance is the display rounding (0.05 percentage points for a
    percentage shown to 0.1%, 0.5 pair for a count shown whole)."""
    import polars as pl

    page = request.getfixturevalue(which)
    log = _probe(page, tmp_path, BUYS_PROBE.replace("POSITIONS", json.dumps(POSITIONS)))
    rows = (pl.scan_parquet(str(page.parent / "annotated" / "*.parquet"))
            .filter((pl.col("decision") != "error") & pl.col("clean_score").is_not_null()).select("clean_score")
            .collect()["clean_score"])
    n = len(rows)
    assert log["column"] == "clean_score" and len(log["positions"]) == len(POSITIONS) and n > 20
    noise = 1 - rows.mean()
    for state in log["positions"]:
        t = state["k"] / 1000
        kept = rows.filter(rows >= t)
        assert float(state["th-value"]) == pytest.approx(t, abs=1e-12)
        assert _numbers(state["th-kept"]) == len(kept)  # exact at an edge
        if len(kept):
            assert abs(_numbers(state["th-exp-precision"]) - 100 * kept.mean()) <= 0.05 + 1e-9, state
        else:
            assert state["th-exp-precision"] == "n/a"
        assert abs(_numbers(state["th-exp-lost"]) - rows.filter(rows < t).sum()) <= 0.5 + 1e-9, state
        assert abs(_numbers(state["th-noise"]) - 100 * noise) <= 0.05 + 1e-9
        assert state["th-cmd-threshold"].startswith("bicro-clean run --input ")
        assert state["th-cmd-threshold"].endswith(f" --threshold {t:g} --overwrite")
        if len(kept):
            fraction = float(re.search(r"--keep-fraction (\S+) --overwrite$", state["th-cmd-fraction"]).group(1))
            assert math.floor(fraction * n + 1e-9) == len(kept)  # select.n_to_keep keeps exactly these pairs
            assert state["th-cmd-select"] == f"bicro-clean select --from OUT --keep-fraction {fraction:g}"
        else:
            assert "no keep fraction" in state["th-cmd-fraction"] and state["th-cmd-select"] == ""
