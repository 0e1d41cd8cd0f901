"""The HTML report: self-contained, deterministic, clean_score as its main column (headline AUROC, histogram,
galleries, slider), clean_score next to an aligned encoder's cosine, and it renders in headless Chromium.

Most tests read small runs written by report_fixture (real shards, synthetic scores, every variant: truth known or
not, aligned encoder or not, a run from before clean_score); one whole pipeline run checks the real thing end to
end, loss mixtures included.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import roc_auc_score

from conftest import image_folder, tiny_config
from report_fixture import BROWSER_FLAGS, Options, build_run, chromium, config_of, slider_data
from bicro_clean.models.bicro import BiCroModel
from bicro_clean.models.diagnostics import mixture_density, normalised_losses
from bicro_clean.pipeline.make_shards import make_shards
from bicro_clean.pipeline.manifest_shards import read_manifest
from bicro_clean.pipeline.report import buys, compare, scan, threshold, write_report
from bicro_clean.pipeline.report.commands import changed_settings, run_commands
from bicro_clean.pipeline.report.gallery import score_text
from bicro_clean.pipeline.report.page import SELECT_REASONS, reason_table, reason_text
from bicro_clean.pipeline.report.scan import Rule, annotated_paths, binned_auroc, scan_annotated
from bicro_clean.pipeline.report.slider import script_json
from bicro_clean.pipeline.report.svg import nice_ticks
from bicro_clean.pipeline.report.threshold import BINS, ColumnBins, ScoreBins, add_bins
from bicro_clean.pipeline.run import run_pipeline

SECTIONS = ('id="counts"', 'id="reasons"', 'id="threshold"', 'id="plots"', 'id="shards"', 'id="lowest"',
            'id="borderline"', 'id="random_kept"')


@pytest.fixture(scope="module")
def truth_run(tmp_path_factory) -> Path:
    """Aligned encoder, truth_clean known, top half by clean_score kept."""
    return build_run(tmp_path_factory.mktemp("truth"))


@pytest.fixture(scope="module")
def blind_run(tmp_path_factory) -> Path:
    """Aligned encoder, no truth_clean, clean_score >= 0.5 kept."""
    return build_run(tmp_path_factory.mktemp("blind"), Options(truth=False, keep_fraction=None, seed=1))


@pytest.fixture(scope="module")
def unaligned_run(tmp_path_factory) -> Path:
    """encoder_cosine all null (a towers encoder), truth known."""
    return build_run(tmp_path_factory.mktemp("unaligned"), Options(aligned=False, seed=2))


def _page(out: Path) -> str:
    return (out / "report.html").read_text(encoding="utf-8")


def _annotated(out: Path) -> dict[str, np.ndarray]:
    """Every annotated row of the run, scored rows only (decision != error)."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "annotated").glob("*.parquet"))])
    table = table.filter(pc.not_equal(table["decision"], "error"))
    return {c: np.asarray(table[c].to_pylist(), dtype=object) for c in table.column_names}


def _floats(rows: dict[str, np.ndarray], column: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in rows[column]], dtype=np.float64)


def _stat(page: str, title: str) -> str:
    found = re.search(rf'<div class="k">{re.escape(title)}</div><div class="v">([^<]*)</div>', page)
    assert found, f"no stat card {title!r}"
    return found.group(1)


def _compare_card(page: str) -> str:
    found = re.search(r'<div class="card compare" id="compare">(.*?)</table></div>', page, re.S)
    assert found, "no comparison card"
    return found.group(1)


def _cell(card: str, label: str) -> str:
    found = re.search(rf'<td>(?:<code>)?{re.escape(label)}(?:</code>)?</td><td class="n">([^<]*)</td>', card)
    assert found, f"no row {label!r} in the comparison card"
    return found.group(1)


# ---------------------------------------------------------------- the page, from small synthetic runs


def test_report_is_self_contained_with_every_section(truth_run):
    page = _page(truth_run)
    for section in SECTIONS:
        assert section in page
    assert page.count("<svg") >= 8  # clean_score and p_clean histograms, 6 threshold curves
    assert len(re.findall(r'<img [^>]*src="data:image/jpeg;base64,', page)) >= 12
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page)
    assert "<link" not in page and "@import" not in page
    assert page.count("<script") == 2 and not re.search(r"<script[^>]*\bsrc\s*=", page)  # inline data + code
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "colour 1 &lt;b&gt;&amp;" in page and "<b>&" not in page
    data = slider_data(page)  # the captions reach the slider as JSON, with < > & as \u escapes
    assert any(x["caption"].startswith("colour") and "<b>&" in x["caption"] for x in data["examples"])
    assert "\\u003cb\\u003e\\u0026" in page
    assert "noisy set" not in page  # the rule is the column alone now: no mixture drop to explain


def test_clean_score_is_the_headline_column(truth_run):
    page, rows = _page(truth_run), _annotated(truth_run)
    manifest = json.loads((truth_run / "manifest.json").read_text())
    known = np.array([t is not None for t in rows["truth_clean"]])
    truth = rows["truth_clean"][known].astype(bool)
    expected = roc_auc_score(truth, _floats(rows, "clean_score")[known])
    assert 0.6 < expected < 0.99  # the fixture's scores rank well but not perfectly: the check can fail
    assert _stat(page, "AUROC clean_score") == f"{expected:.3f}" and "AUROC soft_label" not in page
    kept = rows["decision"] == "keep"
    assert _stat(page, "Expected kept precision") == f"{_floats(rows, 'clean_score')[kept].mean():.1%}"
    plots = re.search(r'<section id="plots">(.*?)</section>', page, re.S).group(1)
    assert plots.index("<h3>clean_score</h3>") < plots.index("<h3>p_clean</h3>")
    assert 'aria-label="histogram of clean_score"' in plots and "cutoff " in plots  # marker at the run's cut
    data = slider_data(page)
    assert [c["name"] for c in data["columns"]] == ["clean_score", "soft_label", "p_clean", "consistency",
                                                     "match_score", "encoder_cosine"]
    assert data["rule"] == {"column": "clean_score", "threshold": manifest["cutoff"]["value"]}
    curves = re.search(r'<div class="plots three">(.*?)</section>', page, re.S).group(1)
    assert re.findall(r"<h3>([a-z_]+)</h3>", curves)[0] == "clean_score"
    scored = manifest["counts"]["in"] - manifest["counts"]["errors"]
    for column in data["columns"]:
        assert len(column["total"]) == BINS + 1 and sum(column["total"]) == scored
        assert column["clean"] is not None and sum(column["known"]) == scored


def test_galleries_rank_by_the_selection_column(truth_run):
    config, manifest = config_of(truth_run), json.loads((truth_run / "manifest.json").read_text())
    rule = Rule.from_run(config, manifest)
    assert rule == Rule("clean_score", manifest["cutoff"]["value"], True)
    stats, picks = scan_annotated(annotated_paths(config, manifest), rule, seed=0)
    assert stats.scored == manifest["counts"]["in"] - manifest["counts"]["errors"]
    scores = np.sort(_floats(_annotated(truth_run), "clean_score"))
    lowest = [r["clean_score"] for r in picks["lowest"]]
    assert lowest == scores[:12].tolist()  # the 12 lowest of the run, in order
    distance = np.abs(scores - rule.threshold)
    assert [abs(r["clean_score"] - rule.threshold) for r in picks["borderline"]] == sorted(distance)[:12]
    assert {r["decision"] for r in picks["random_kept"]} == {"keep"}
    page = _page(truth_run)
    assert "<h2>Lowest clean_score</h2>" in page and "expected share of clean pairs" in page
    assert "consistency / 2" not in page  # soft_label's 0.500 story is for soft_label runs only
    assert "(not found)" not in page  # every anchor resolved to its shard
    for sid, counts in stats.shards.items():
        assert f"<code>{sid}</code>" in page and counts["in"] > 0
    assert sum(s["kept"] for s in stats.shards.values()) == manifest["counts"]["kept"]


def test_comparison_card_with_truth_shows_both_aurocs(truth_run):
    rows, card = _annotated(truth_run), _compare_card(_page(truth_run))
    truth = rows["truth_clean"].astype(bool)
    for column in ("clean_score", "encoder_cosine"):
        assert _cell(card, column) == f"{roc_auc_score(truth, _floats(rows, column)):.3f}"
    assert _cell(card, "clean_score") != _cell(card, "encoder_cosine")
    assert "Spearman" not in card


def test_comparison_card_without_truth_shows_agreement(blind_run):
    page, rows = _page(blind_run), _annotated(blind_run)
    clean, cosine = _floats(rows, "clean_score"), _floats(rows, "encoder_cosine")
    card = _compare_card(page)
    assert "AUROC" not in page and "True noise rate" not in page
    assert _cell(card, "Spearman rank correlation") == f"{spearmanr(clean, cosine).statistic:.3f}"
    k = int((rows["decision"] == "keep").sum())
    overlap = len(set(np.argsort(-clean)[:k]) & set(np.argsort(-cosine)[:k])) / k
    assert 0 < overlap < 1 and _cell(card, "kept-set overlap") == f"{overlap:.1%}"
    assert f"all {len(clean):,} scored pairs" in card and f"top {k:,} by clean_score" in card
    assert set(rows["reason"]) == {"kept", "low_clean_score"}  # a threshold run
    assert "Dropped: clean_score below select.threshold." in page
    assert slider_data(page)["rule"] == {"column": "clean_score", "threshold": 0.5}


def test_no_comparison_card_for_an_unaligned_encoder(unaligned_run):
    page = _page(unaligned_run)
    assert 'id="compare"' not in page and "encoder_cosine" not in page
    assert "encoder_cosine" not in [c["name"] for c in slider_data(page)["columns"]]
    assert re.fullmatch(r"0\.\d{3}", _stat(page, "AUROC clean_score"))


def test_a_run_before_clean_score_still_gets_its_report(tmp_path):
    out = build_run(tmp_path, Options(clean_score=False, column="soft_label", keep_fraction=None, images=8))
    page = _page(out)
    assert _stat(page, "AUROC soft_label") and "AUROC clean_score" not in page
    assert 'id="compare"' not in page and "Expected kept precision" not in page  # no clean_score to compare
    assert "<h2>Lowest soft_label</h2>" in page and "consistency / 2" in page  # where soft_label 0.500 comes from
    data = slider_data(page)
    assert data["columns"][0]["name"] == "soft_label" and data["rule"]["column"] == "soft_label"


def test_reason_table_explains_the_rule_and_still_lists_unknown_reasons():
    assert "noisy_division" not in SELECT_REASONS  # the select stage no longer gives that reason
    assert reason_text("low_clean_score") == "Dropped: clean_score below select.threshold."
    assert reason_text("below_keep_fraction").startswith("Dropped: ranked below")
    table = reason_table({"by_reason": {"kept": 5, "low_clean_score": 3, "noisy_division": 1, "new<reason>": 1}})
    for code in ("kept", "low_clean_score", "noisy_division", "new&lt;reason&gt;"):
        assert f"<code>{code}</code>" in table  # an unknown code (an older run's, a newer one's) keeps its row
    assert table.count("<tr>") == 5 and "<reason>" not in table


def test_tiny_scores_are_not_shown_as_zero():
    # clean_score has no ties: a confidently noisy pair's 1.2e-05 must not read 0.000 like a hard zero
    assert score_text(1.23e-5) == "1.2e-05" and score_text(0.0) == "0.000"
    assert score_text(0.5) == "0.500" and score_text(-0.25) == "-0.250" and score_text(-1e-4) == "-1.0e-04"


def test_report_bytes_are_deterministic(truth_run):
    first = (truth_run / "report.html").read_bytes()
    path = write_report(config_of(truth_run), str(truth_run / "manifest.json"))
    assert Path(path).read_bytes() == first
    assert not list(truth_run.glob(".tmp-*"))


# ---------------------------------------------------------------- agreement arithmetic


def test_spearman_and_ranks_match_scipy():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 20, 500).astype(np.float64)  # many ties
    b = a + rng.normal(0, 8, 500)
    assert np.array_equal(compare.average_ranks(a), rankdata(a))
    assert compare.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert compare.spearman(a, np.ones(500)) is None and compare.spearman(a[:1], b[:1]) is None


def test_sample_is_bounded_and_independent_of_file_order(monkeypatch):
    monkeypatch.setattr(compare, "SAMPLE", 50)  # 300 pairs in 3 files: trimmed on the way and at the end
    rng = np.random.default_rng(4)
    clean, cosine = rng.uniform(0, 1, 300), rng.uniform(-1, 1, 300)
    clean[7] = np.nan  # not compared
    priority = rng.integers(0, 2**63, 300).astype(np.uint64)
    forward, backward = compare.PairSample(), compare.PairSample()
    for part in np.array_split(np.arange(300), 3):
        forward.add(clean[part], cosine[part], priority[part])
    for part in reversed(np.array_split(np.arange(300), 3)):
        backward.add(clean[part], cosine[part], priority[part])
    forward.trim()
    backward.trim()
    assert forward.size == len(forward.priority) == 50 and forward.pairs == 299
    assert sorted(forward.priority.tolist()) == sorted(backward.priority.tolist())
    assert set(forward.priority.tolist()) == set(np.sort(np.delete(priority, 7))[:50].tolist())
    same = compare.PairSample()
    same.add(clean, clean, priority)
    found = compare.agreement(same, 0.2)
    assert found.overlap == 1.0 and found.spearman == pytest.approx(1.0) and found.k == 10
    assert compare.agreement(compare.PairSample(), 0.5) is None


# ---------------------------------------------------------------- threshold data, SVG ticks


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


def test_binned_auroc_and_ticks():
    assert binned_auroc(np.array([0, 0, 3]), np.array([2, 0, 0])) == 1.0
    assert binned_auroc(np.array([1, 1]), np.array([1, 1])) == 0.5
    assert binned_auroc(np.array([1]), np.array([0])) is None
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


# ---------------------------------------------------------------- a whole pipeline run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """8 coloured images x 2 captions with 25% caption noise, cleaned with the tiny encoder (as test_run does)."""
    root = tmp_path_factory.mktemp("data")
    images, captions = image_folder(root, 8, (40, 30), lambda i: [f"a picture number {i}", f"colour {i} <b>&"])
    make_shards(images, captions, root / "shards", shard_size=6, noise_rate=0.25)
    out = tmp_path_factory.mktemp("out")
    summary = run_pipeline(tiny_config(str(root / "shards" / "*.tar"), out, select={"keep_fraction": 0.5}))
    assert summary["report"] == str(out / "report.html")
    return out


def test_whole_run_report_leads_with_clean_score(run):
    page = _page(run)
    manifest = read_manifest(str(run))  # with its per-shard part: the annotated files' paths
    for section in SECTIONS:
        assert section in page
    assert page.count("<svg") >= 10  # 2 histograms, 6 threshold curves, one mixture per network
    assert "<h3>Network A</h3>" in page and "<h3>Network B</h3>" in page
    assert re.fullmatch(r"[01]\.\d{3}", _stat(page, "AUROC clean_score"))  # make_shards writes truth_clean
    card = _compare_card(page)  # the tiny encoder is aligned: clean_score next to encoder_cosine
    assert re.fullmatch(r"[01]\.\d{3}", _cell(card, "encoder_cosine"))
    data = slider_data(page)
    assert data["columns"][0]["name"] == "clean_score"
    assert data["rule"] == {"column": "clean_score", "threshold": manifest["cutoff"]["value"]}
    assert "(not found)" not in page and "colour 1 &lt;b&gt;&amp;" in page
    assert not set(manifest["counts"]["by_reason"]) - {"kept", "below_keep_fraction"}
    config = config_of(run)
    stats, _ = scan_annotated(annotated_paths(config, manifest), Rule.from_run(config, manifest), seed=0)
    assert sum(s["in"] for s in stats.shards.values()) == manifest["counts"]["in"]
    assert sum(s["kept"] for s in stats.shards.values()) == manifest["counts"]["kept"]
    path = write_report(config, str(run / "manifest.json"))  # rewritten from the same outputs: the same bytes
    assert Path(path).read_text(encoding="utf-8") == page
    # one noise estimate: 1 - mean clean_score, the figure the run summary and the manifest carry
    noise = 1 - np.nanmean(_floats(_annotated(run), "clean_score"))
    assert _stat(page, "Estimated noise") == f"{noise:.1%}" and page.count("Estimated noise") == 1
    if "estimates" in manifest:
        assert slider_data(page)["noise"] == manifest["estimates"]["noise_share"]


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


# ---------------------------------------------------------------- rendered in a real browser


def _browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_headless_chromium(truth_run, tmp_path):
    url = (truth_run / "report.html").as_uri()
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


# ---------------------------------------------------------------- what a threshold buys, without labels


def _score_rows(values: np.ndarray, truth: np.ndarray | None = None, kinds: list | None = None) -> dict:
    n = len(values)
    return {"shard": np.array(["s"] * n, dtype=object), "key": np.array([f"{i:06d}" for i in range(n)], dtype=object),
            "decision": np.array(["keep"] * n, dtype=object), "caption": np.array([""] * n, dtype=object),
            "truth_clean": truth if truth is not None else np.full(n, None, dtype=object), "clean_score": values,
            "noise_kind": np.array(kinds if kinds is not None else [None] * n, dtype=object)}


@pytest.mark.parametrize("chunk", [threshold.CHUNK, 7])
def test_expected_precision_and_clean_lost_are_exact_at_edges_however_grouped(monkeypatch, chunk):
    """Per-bin clean_score sums (fixed point, int64) merged over any grouping of files are the same integers, and
    at every bin edge give the mean clean_score of the pairs at or above it and the sum below it."""
    monkeypatch.setattr(threshold, "CHUNK", chunk)  # 7: the chunked bincount path, every chunk exact
    rng = np.random.default_rng(5)
    values = rng.beta(0.4, 0.4, 3000)
    values[::97] = np.nan  # pairs without a clean_score: left out of every figure
    files = np.array_split(np.arange(3000), 6)

    def scanned(groups: list[list[int]]) -> ColumnBins:
        merged = ScoreBins({"clean_score": ColumnBins("clean_score", 0.0, 1.0)})
        for group in groups:
            part = ScoreBins({"clean_score": ColumnBins("clean_score", 0.0, 1.0)})
            for f in group:
                rows = _score_rows(values[files[f]])
                add_bins(part, rows, np.ones(len(files[f]), bool), np.arange(len(files[f]), dtype=np.uint64))
            threshold.merge_bins(merged, part)
        return merged

    one = scanned([[0, 1, 2, 3, 4, 5]])
    for groups in ([[0, 1], [2, 3, 4], [5]], [[0], [1], [2], [3], [4], [5]]):
        other = scanned(groups).columns["clean_score"]
        assert np.array_equal(other.score_sum, one.columns["clean_score"].score_sum)
        assert np.array_equal(other.estimated, one.columns["clean_score"].estimated)
    finite = values[np.isfinite(values)]
    assert one.noise_share() == pytest.approx(1 - finite.mean(), abs=1e-9)
    expected = one.columns["clean_score"].expected()
    for k in (0, 1, 200, 500, 777, 900, BINS):
        t = k / BINS
        kept = finite[finite >= t]
        want = kept.mean() if len(kept) else np.nan
        assert expected["precision"][k] == pytest.approx(want, abs=1e-9, nan_ok=True)
        assert expected["lost"][k] == pytest.approx(finite[finite < t].sum(), abs=1e-6)


def test_the_page_says_when_the_threshold_matters_little():
    rng = np.random.default_rng(6)
    bimodal = np.r_[rng.uniform(0, 0.05, 600), rng.uniform(0.95, 1.0, 380), rng.uniform(0.2, 0.9, 20)]
    spread = rng.uniform(0, 1, 1000)
    notes = {}
    for name, values in (("bimodal", bimodal), ("spread", spread)):
        bins = ScoreBins({"clean_score": ColumnBins("clean_score", 0.0, 1.0)})
        add_bins(bins, _score_rows(values), np.ones(len(values), bool), np.arange(len(values), dtype=np.uint64))
        notes[name] = buys.flat_note(bins)
    moved = int(((bimodal >= 0.2) & (bimodal < 0.9)).sum())
    assert f"changes the kept count by {moved:,} pairs" in notes["bimodal"]
    assert "the threshold matters little" in notes["bimodal"] and "bimodal" in notes["bimodal"]
    assert "The threshold matters on this crawl" in notes["spread"] and "matters little" not in notes["spread"]


def test_detection_per_noise_kind_matches_sklearn():
    rng = np.random.default_rng(7)
    kinds = rng.choice(["clean", "shuffle", "near-miss", "made-up"], 2000, p=[0.6, 0.2, 0.15, 0.05])
    values = np.clip(rng.normal(np.where(kinds == "clean", 0.7, np.where(kinds == "near-miss", 0.5, 0.3)), 0.2),
                     0, 1)
    truth = np.array([bool(k == "clean") for k in kinds], dtype=object)
    rows = _score_rows(values, truth, list(kinds))
    rows["decision"] = np.where(values >= 0.5, "keep", "drop").astype(object)
    rows.update({c: np.full(2000, np.nan) for c in ("soft_label", "p_clean", "encoder_cosine")})
    stats = scan.Stats(bins=ScoreBins({"clean_score": ColumnBins("clean_score", 0.0, 1.0)}))
    stats.auc = scan.auc_columns(Rule("clean_score", 0.5, False), stats.bins)
    scan.add_stats(stats, rows, Rule("clean_score", 0.5, False), np.arange(2000, dtype=np.uint64))
    found = {kind: (pairs, kept, auroc) for kind, pairs, kept, auroc in stats.kind_rows()}
    assert list(found) == ["clean", "shuffle", "near-miss", "other"]  # known kinds in order; the rest as other
    for kind, name in (("shuffle", "shuffle"), ("near-miss", "near-miss"), ("made-up", "other")):
        mask = (kinds == "clean") | (kinds == kind)
        assert found[name][2] == pytest.approx(roc_auc_score(kinds[mask] == "clean", values[mask]), abs=2e-3)
        assert found[name][:2] == ((kinds == kind).sum(), ((kinds == kind) & (values >= 0.5)).sum())
    assert found["clean"][2] is None


def test_the_rerun_command_reproduces_the_run_config(truth_run, tmp_path):
    """The slider's command, given to `bicro-clean config` (which takes exactly run's flags) with a CONFIG.yaml
    holding the settings the page says came from a file, is this run's configuration with only the rule changed."""
    import shlex

    import yaml
    from typer.testing import CliRunner

    from bicro_clean.cli import app

    config = config_of(truth_run)
    commands = run_commands(config, by_fraction=True)
    assert commands.from_file and all(name.startswith("bicro.") for name in commands.from_file)
    settings = changed_settings(config)
    file = {}
    for name in commands.from_file:
        section, field = name.split(".")
        file.setdefault(section, {})[field] = settings[name]
    (tmp_path / "CONFIG.yaml").write_text(yaml.safe_dump(file))
    assert "--out OUT " in commands.run and commands.select == "bicro-clean select --from OUT"  # not its path
    argv = shlex.split(commands.run.replace("CONFIG.yaml", str(tmp_path / "CONFIG.yaml")))[2:]
    argv[argv.index("--out") + 1] = config.output  # OUT: the folder holding the page
    done = CliRunner().invoke(app, ["config", *argv, "--threshold", "0.25"])
    assert done.exit_code == 0, done.output
    effective = yaml.safe_load(done.output)
    effective["out"].pop("overwrite", None)  # who may write, not what is written (not in model_dump either)
    want = config.model_dump(mode="json")
    want["select"] = {**want["select"], "threshold": 0.25, "keep_fraction": None}
    for section in ("reader", "bicro", "select", "out"):
        assert effective[section] == want[section], section
    for field in ("encoder", "dtype", "autocast"):
        assert effective["embed"][field] == want["embed"][field]
    assert effective["input"] in (config.input, [config.input]) and effective["output"] == config.output


def test_the_page_shows_one_noise_estimate_and_the_new_galleries(blind_run, tmp_path):
    truth_run = build_run(tmp_path, Options(images=48))  # 96 pairs: the rule gets some wrong both ways
    for out, truth in ((truth_run, True), (blind_run, False)):
        page, rows = _page(out), _annotated(out)
        scores = _floats(rows, "clean_score")
        assert _stat(page, "Estimated noise") == f"{1 - np.nanmean(scores):.1%}"
        assert page.count("Estimated noise") == 1 and "mixture noisy weight" not in page
        assert slider_data(page)["noise"] == pytest.approx(1 - np.nanmean(scores), abs=1e-9)
        assert 'id="random_dropped"' in page and 'id="flat-note"' in page
        assert ('id="kept_noisy"' in page) == truth and ('id="dropped_clean"' in page) == truth
        assert ('id="kinds"' in page) == truth  # the fixture writes noise_kind where truth is known
    config, manifest = config_of(truth_run), json.loads((truth_run / "manifest.json").read_text())
    _, picks = scan_annotated(annotated_paths(config, manifest), Rule.from_run(config, manifest), seed=0)
    assert picks["kept_noisy"] and {(r["decision"], r["truth_clean"]) for r in picks["kept_noisy"]} == {("keep", False)}
    assert picks["dropped_clean"] and {(r["decision"], r["truth_clean"]) for r in picks["dropped_clean"]} == {
        ("drop", True)}
    assert picks["random_dropped"] and {r["decision"] for r in picks["random_dropped"]} == {"drop"}


def test_the_page_shows_the_noise_estimate_the_manifest_records(tmp_path):
    """Where the manifest records the run's estimates (the figures the run summary printed), the page shows those
    very numbers, in its card and at every slider position."""
    out = build_run(tmp_path, Options(images=8, keep_fraction=None))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["estimates"] = {"noise_share": 0.123456, "kept_precision": 0.876543, "clean_lost": 1.5, "scored": 16}
    (out / "manifest.json").write_text(json.dumps(manifest))
    page = Path(write_report(config_of(out), str(out / "manifest.json"))).read_text(encoding="utf-8")
    assert _stat(page, "Estimated noise") == "12.3%" and _stat(page, "Expected kept precision") == "87.7%"
    assert slider_data(page)["noise"] == 0.123456
