"""The report's threshold slider in a real browser: headless Chromium opens report.html (file://, no network),
a small inline script moves the slider and changes the column the way a user does (set the value, dispatch the
input / change event), and the dumped DOM shows the readouts and the nearest pairs updated.

Skipped when no chromium binary is installed (apt-get install -y chromium).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import image_folder, tiny_config
from bicro_clean.pipeline.make_shards import make_shards
from bicro_clean.pipeline.run import run_pipeline

pytestmark = pytest.mark.slow  # a pipeline run plus three browser starts: ~15 s on 2 cores

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync")

# Runs after the report's own script: record the readouts, move the slider to the top, record again, then
# switch the column to p_clean and record once more. The results land in a <pre> that --dump-dom prints.
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
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(log);
  document.body.appendChild(pre);
})();
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium binary on PATH (chromium, chromium-browser, google-chrome): "
                "apt-get install -y chromium to run the browser test")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A small cleaned run (25% caption noise, truth_clean known) and its report, captions carrying markup."""
    root = tmp_path_factory.mktemp("data")
    images, captions = image_folder(root, 8, (40, 30), lambda i: [f"a picture number {i}", f"colour {i} <b>&"])
    make_shards(images, captions, root / "shards", shard_size=6, noise_rate=0.25)
    out = tmp_path_factory.mktemp("out")
    run_pipeline(tiny_config(str(root / "shards" / "*.tar"), out, select={"keep_fraction": 0.5}))
    return out / "report.html"


def _dump(browser: str, page: Path, profile: Path) -> str:
    done = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def test_slider_moves_update_the_kept_count(report, tmp_path):
    browser = _chromium()
    page = report.read_text(encoding="utf-8")
    assert page.count("</body>") == 1
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    # The report's own CSP allows inline scripts only, so the probe runs like the report's script does.
    dom = _dump(browser, probed, tmp_path / "profile")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe script did not run: " + dom[-2000:]
    log = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                     .replace("&gt;", ">"))

    def kept(state: dict) -> int:
        return int(state["th-kept"].replace(",", ""))

    before, top, bottom = log["before"], log["top"], log["bottom"]
    assert before["column"] == "soft_label" and before["pairs"] > 0
    assert kept(bottom) > kept(before) > kept(top)  # moving the slider changes the kept count, monotonically
    assert bottom["th-frac"] == "100.0%" and top["th-value"] != before["th-value"]
    assert before["th-precision"].endswith("%") and bottom["th-recall"] == "100.0%"  # truth_clean is known
    assert top["kept_pairs"] < top["pairs"] and bottom["kept_pairs"] == bottom["pairs"]
    assert log["p_clean"]["column"] == "p_clean" and log["p_clean"]["th-value"] != bottom["th-value"]


def test_plain_report_runs_its_script_without_errors(report, tmp_path):
    dom = _dump(_chromium(), report, tmp_path / "profile")
    kept = re.search(r'id="th-kept">([^<]*)<', dom)
    assert kept and re.fullmatch(r"[\d,]+", kept.group(1))  # filled in by the script on load
    assert len(re.findall(r'class="th-pair (keep|drop)"', dom)) > 0
    assert "<b>&" not in dom and "colour" in dom  # captions inserted as text, never as markup
