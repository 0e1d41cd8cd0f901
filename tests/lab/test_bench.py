"""The benchmark suite end to end in its tiny configuration (CPU, in-process): every stage runs and the JSON
holds the headline keys with sane values. No timing is asserted (shared CI machines)."""

from __future__ import annotations

import json
import math

from bicro_clean.lab.bench_plan import make_plan
from bicro_clean.lab.bench_suite import run_suite
from bicro_clean.lab.bench_summary import markdown


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_bench_runs_every_stage(tmp_path):
    partial = tmp_path / "partial.json"
    result = run_suite(make_plan(quick=True, tiny=True, cuda=False), data_dir=None, partial=partial)
    json.loads(json.dumps(result))  # serialisable as written by the CLI
    assert json.loads(partial.read_text())["decode"]["runs"]
    for key in ("overhead_ratio", "score_pairs_per_s", "embed_pairs_per_s", "fit_seconds_per_epoch", "peak_rss_mb",
                "machine", "decode_samples_per_s"):
        assert key in result, key
    assert _positive(result["overhead_ratio"])
    assert result["overhead_ratio_setting"] == "tiny|cpu|fp32"
    assert all(_positive(v) for v in result["decode_samples_per_s"].values())
    assert set(result["embed_pairs_per_s"]) == {"tiny|cpu|fp32"}
    assert all(_positive(v) for v in result["embed_pairs_per_s"].values())
    assert set(result["fit_seconds_per_epoch"]) == {"300|auto", "600|auto"}
    assert set(result["fit_us_per_pair"]) == {"300", "600"}
    for epoch in result["fit_seconds_per_epoch"].values():
        assert _positive(epoch["warmup"]) and _positive(epoch["cotrain"])
    kinds = {k.split("|")[0] for k in result["score_pairs_per_s"]}
    indexes = {k.split("|")[1] for k in result["score_pairs_per_s"]}
    assert kinds == {"score", "path"} and indexes == {"flat", "ivf"}
    assert all(_positive(v) for v in result["score_pairs_per_s"].values())
    assert set(result["peak_rss_mb"]) == {"decode", "embed", "fit", "score"}
    assert _positive(result["peak_rss_mb"]["decode"])
    detail = result["overhead_ratio_detail"]["tiny|cpu|fp32"]
    assert "extrapolated" in detail["how"] and detail["fit_pairs"] == 600  # the plan's fit_sample
    assert math.isclose(detail["ratio"], (detail["fit_s"] + detail["score_write_s"]) / detail["embed_s"], rel_tol=0.01)
    table = markdown(result)
    assert "| read+decode |" in table and "| overhead ratio |" in table


def test_plans_fit_the_default_sample_and_skip_1m_when_quick():
    from bicro_clean.pipeline.config import BiCroConfig

    sample = BiCroConfig().fit_sample
    quick, full = make_plan(quick=True, cuda=False), make_plan(quick=False, cuda=False)
    assert sample in quick.fit_sizes and sample in full.fit_sizes
    assert max(quick.fit_sizes) < 1_000_000 and {10_000, 100_000, 1_000_000} <= set(full.fit_sizes)
    assert quick.score_kinds == ["auto"] and set(full.score_kinds) == {"flat", "ivf"}
    assert 100_000 in quick.score_anchors
