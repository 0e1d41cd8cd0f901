"""The HTML report: self-contained, deterministic, and it renders (plots and thumbnails) in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import image_folder, tiny_config
from bicro_clean.models.bicro import BiCroModel
from bicro_clean.models.diagnostics import mixture_density, normalised_losses
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.make_shards import make_shards
from bicro_clean.pipeline.report import write_report
from bicro_clean.pipeline.report.scan import Rule, annotated_paths, binned_auroc, scan_annotated
from bicro_clean.pipeline.report.slider import script_json
from bicro_clean.pipeline.report.threshold import BINS, ColumnBins, ScoreBins, add_bins
from bicro_clean.pipeline.report.svg import nice_ticks
from bicro_clean.pipeline.run import run_pipeline

SECTIONS = ('id="counts"', 'id="reasons"', 'id="threshold"', 'id="plots"', 'id="shards"', 'id="lowest"',
            'id="borderline"', 'id="random_kept"')


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """8 coloured images x 2 captions with 25% caption noise, cleaned with the tiny encoder (as test_run does)."""
    root = tmp_path_factory.mktemp("data")
    # The second caption carries markup, which the report must escape.
    images, captions = image_folder(root, 8, (40, 30), lambda i: [f"a picture number {i}", f"colour {i} <b>&"])
    make_shards(images, captions, root / "shards", shard_size=6, noise_rate=0.25)
    out = tmp_path_factory.mktemp("out")
    summary = run_pipeline(tiny_config(str(root / "shards" / "*.tar"), out, select={"keep_fraction": 0.5}))
    assert summary["report"] == str(out / "report.html")
    return out


def _config(out: Path) -> CleanConfig:
    manifest = json.loads((out / "manifest.json").read_text())
    return CleanConfig.model_validate({**manifest["config"], "output": str(out)})


def test_report_is_self_contained_with_every_section(run):
    page = (run / "report.html").read_text()
    for section in SECTIONS:
        assert section in page
    assert page.count("<svg") >= 8  # soft_label, p_clean, 4 threshold curves, one mixture per network
    assert len(re.findall(r'<img [^>]*src="data:image/jpeg;base64,', page)) >= 12
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page)
    assert "<link" not in page and "@import" not in page
    assert page.count("<script") == 2 and not re.search(r"<script[^>]*\bsrc\s*=", page)  # inline data + code
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "True noise rate" in page and "AUROC" in page  # make_shards writes truth_clean
    assert "colour 1 &lt;b&gt;&amp;" in page and "<b>&" not in page
    data = _slider_data(page)  # the captions reach the slider as JSON, with < > & as \u escapes
    assert any(x["caption"].startswith("colour") and "<b>&" in x["caption"] for x in data["examples"])
    assert "\\u003cb\\u003e\\u0026" in page


def _slider_data(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="threshold-data">(.*?)</script>', page, re.S)
    assert found
    return json.loads(found.group(1))


def test_threshold_data_and_shard_table_match_the_run(run):
    page = (run / "report.html").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    counts = manifest["counts"]
    scored = counts["in"] - counts["errors"]
    data = _slider_data(page)
    names = [c["name"] for c in data["columns"]]
    assert names[:4] == ["soft_label", "p_clean", "consistency", "match_score"] and "clean_score" not in names
    for column in data["columns"]:
        assert len(column["total"]) == BINS + 1 and sum(column["total"]) == scored
        assert column["clean"] is not None and sum(column["known"]) == scored  # make_shards writes truth_clean
    assert data["rule"] == {"column": "soft_label", "threshold": manifest["cutoff"]["value"]}
    assert data["examples"] and all(x["img"] is None or x["img"].startswith("data:image/jpeg;base64,")
                                    for x in data["examples"])
    config = _config(run)
    stats, _ = scan_annotated(annotated_paths(config, manifest), Rule.from_run(config, manifest), seed=0)
    assert sum(s["in"] for s in stats.shards.values()) == counts["in"]
    assert sum(s["kept"] for s in stats.shards.values()) == counts["kept"]
    assert sum(s["dropped"] for s in stats.shards.values()) == counts["dropped"]
    for sid in stats.shards:
        assert f"<code>{sid}</code>" in page
    assert "consistency / 2" in page  # the borderline gallery says where soft_label 0.500 comes from


def test_script_json_cannot_close_its_script():
    text = script_json({"caption": "</script><script>alert(1)</script><!-- & >"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"caption": "</script><script>alert(1)</script><!-- & >"}


def test_threshold_bins_are_exact_at_bin_edges():
    rng = np.random.default_rng(1)
    values = np.r_[rng.uniform(-0.3, 0.8, 5000), -0.3, 0.8, np.nan]
    truth = np.array([bool(t) for t in rng.integers(0, 2, len(values) - 1)] + [None], dtype=object)
    rows = {"shard": np.array(["s"] * len(values), dtype=object),
            "key": np.array([f"{i:05d}" for i in range(len(values))], dtype=object),
            "decision": np.array(["keep"] * len(values), dtype=object), "caption": np.array([""] * len(values)),
            "truth_clean": truth, "match_score": values}
    bins = ScoreBins({"match_score": ColumnBins("match_score", -0.3, 0.8)})
    add_bins(bins, rows, np.ones(len(values), dtype=bool), np.arange(len(values), dtype=np.uint64))
    column = bins.columns["match_score"]
    curves = column.curves()
    finite = values[~np.isnan(values)]
    clean = np.array([t is True for t in truth])[~np.isnan(values)]
    for k in (0, 1, 137, 500, 999, BINS):
        edge = column.edges()[k]
        kept = finite >= edge
        if abs(finite - edge).min() > 1e-9:  # away from float rounding at the edge itself
            assert curves["kept"][k] * len(finite) == pytest.approx(kept.sum())
            assert curves["recall"][k] == pytest.approx((kept & clean).sum() / clean.sum())
    assert column.total[BINS] == 1  # the maximum sits in the last bin: kept at the top edge
    examples = [row for ex in column.examples.values() for _, row in ex]
    assert 0 < len(examples) <= 32 * 2


def test_report_bytes_are_deterministic(run):
    first = (run / "report.html").read_bytes()
    path = write_report(_config(run), str(run / "manifest.json"))
    assert Path(path).read_bytes() == first
    assert not list(run.glob(".tmp-*"))


def test_galleries_pick_the_right_rows_and_resolve_anchors(run):
    config = _config(run)
    manifest = json.loads((run / "manifest.json").read_text())
    rule = Rule.from_run(config, manifest)
    assert rule.by_fraction and rule.threshold == manifest["cutoff"]["value"]
    assert not Rule.from_run(config.model_copy(update={"select": config.select.model_copy(
        update={"keep_fraction": None})}), manifest).by_fraction
    stats, picks = scan_annotated(annotated_paths(config, manifest), rule, seed=0)
    assert stats.scored == manifest["counts"]["in"] - manifest["counts"]["errors"]
    lowest = [r["soft_label"] for r in picks["lowest"]]
    assert lowest == sorted(lowest) and len(lowest) == 12
    assert {r["decision"] for r in picks["random_kept"]} == {"keep"} and len(picks["random_kept"]) == 8
    distance = [abs(r["soft_label"] - rule.threshold) for r in picks["borderline"]]
    assert distance == sorted(distance)
    assert "(not found)" not in (run / "report.html").read_text()


def test_normalised_losses_match_the_models_own_p_clean(run):
    manifest = json.loads((run / "manifest.json").read_text())
    model = BiCroModel.load(run / manifest["checkpoint"]["path"])
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(5, 64)).astype(np.float32), rng.normal(size=(5, 64)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    losses = normalised_losses(model, image, text)
    assert len(losses) == len(model.nets) == 2
    p_clean = np.mean([m.posterior_clean(x) for m, x in zip(model.mixtures, losses)], axis=0)
    assert np.allclose(p_clean, model.score(image, text)["p_clean"], atol=1e-6)
    clean, noisy = mixture_density(model.mixtures[0], np.linspace(0.01, 0.99, 99))
    assert (clean >= 0).all() and (noisy >= 0).all()
    assert 0.3 < float(np.sum(clean + noisy) * 0.01) < 1.1  # the weighted components integrate to about 1


def test_binned_auroc_and_ticks():
    assert binned_auroc(np.array([0, 0, 3]), np.array([2, 0, 0])) == 1.0
    assert binned_auroc(np.array([1, 1]), np.array([1, 1])) == 0.5
    assert binned_auroc(np.array([1]), np.array([0])) is None
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


# ---------------------------------------------------------------- rendered in a real browser


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("/usr/bin/chromium")
    if not found:
        pytest.skip("chromium not installed: apt-get install -y chromium")
    return found


def _browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_headless_chromium(run, tmp_path):
    url = (run / "report.html").as_uri()
    dom = _browser(tmp_path, "--dump-dom", url).stdout
    assert dom.count("<svg") >= 5 and "<rect" in dom and "<polyline" in dom
    assert len(re.findall(r'<img [^>]*src="data:image/jpeg;base64,', dom)) >= 12
    shot = tmp_path / "report.png"
    _browser(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", url)
    assert shot.stat().st_size > 50_000
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colours = image.convert("RGB").resize((160, 300)).getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50  # text, plots and photos, not a blank page
