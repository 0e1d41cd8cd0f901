"""One join key in every artifact: the same crawl run once with a relative input path from one working directory and
once with an absolute path from another gives the same `shard_id` columns in annotated/, filtered/,
keep_keys.parquet, manifest_shards.parquet, the renamed keys and the anchor keys, and they join. The run's summary
prints the estimates (defined once, pipeline/estimates.py) and why keep_uids.npy was not written."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import TINY_BICRO, TINY_EMBED
from typer.testing import CliRunner

from bicro_clean import cli
from bicro_clean.pipeline import estimates

# the tiny encoder and BiCro, with decode workers at their default (a runner path: workers on)
EMBED = {k: v for k, v in TINY_EMBED.items() if k != "num_workers"}


def _run(cwd: Path, spec: str, out: str, config: Path) -> str:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        result = CliRunner().invoke(cli.app, ["run", "-c", str(config), "--input", spec, "--out", out,
                                              "--runner", "none"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def two_runs(tiny_shards, tmp_path_factory):
    """(stdout, output folder) of a run from the crawl's parent folder with `shards/*.tar`, and of one from
    elsewhere with the absolute path and a relative --out."""
    root = tmp_path_factory.mktemp("join-keys")
    config = root / "tiny.yaml"
    # threshold 0 keeps every scored pair, so the sample renamed apart (a key two shards have) is in renamed_keys
    config.write_text(yaml.safe_dump({"embed": EMBED, "bicro": TINY_BICRO, "select": {"threshold": 0.0}}))
    relative = _run(tiny_shards.parent, f"{tiny_shards.name}/*.tar", str(root / "a"), config)
    (root / "elsewhere").mkdir()
    absolute = _run(root / "elsewhere", str(tiny_shards.resolve() / "*.tar"), "b", config)
    return [(relative, root / "a"), (absolute, root / "elsewhere" / "b")]


def _artifacts(out: Path) -> dict[str, pl.DataFrame]:
    checkpoint = next((out / "checkpoint").glob("bicro-*/model.json"))
    anchors = json.loads(checkpoint.read_text())["anchor_keys"]
    return {
        "annotated": pl.read_parquet(out / "annotated" / "*.parquet").sort("shard_id", "key"),
        "filtered": pl.read_parquet(out / "filtered" / "*.parquet").sort("shard_id", "key"),
        "keep_keys": pl.read_parquet(out / "keep_keys.parquet").sort("shard_id", "key"),
        "manifest_shards": pl.read_parquet(out / "manifest_shards.parquet").sort("shard_id"),
        "anchors": pl.DataFrame({"anchor": anchors}).with_columns(
            pl.col("anchor").str.splitn("/", 2).struct.rename_fields(["shard_id", "key"])).unnest("anchor"),
        "renamed": pl.DataFrame(json.loads((out / "manifest.json").read_text())["renamed_keys"]),
    }


def test_shard_ids_are_the_same_whatever_the_spelling_and_the_working_directory(two_runs):
    (_, a), (_, b) = two_runs
    one, two = _artifacts(a), _artifacts(b)
    for name in one:
        assert one[name]["shard_id"].to_list() == two[name]["shard_id"].to_list(), name
    assert one["annotated"]["key"].to_list() == two["annotated"]["key"].to_list()
    assert one["anchors"].equals(two["anchors"])  # the same fit: its anchors' names do not depend on the spelling
    # `shard` keeps the spec as given: relative in one run, absolute in the other
    assert not Path(one["annotated"]["shard"][0]).is_absolute() and Path(two["annotated"]["shard"][0]).is_absolute()
    assert one["annotated"]["shard"].to_list() != two["annotated"]["shard"].to_list()


def test_every_artifact_joins_on_shard_id(two_runs):
    for _, out in two_runs:
        found = _artifacts(out)
        annotated, keep = found["annotated"], found["keep_keys"]
        assert keep.join(annotated, on=["shard_id", "key"]).filter(pl.col("decision") == "keep").height \
            == keep.height == annotated.filter(pl.col("decision") == "keep").height > 0
        assert found["filtered"].join(keep, on=["shard_id", "key"]).height == found["filtered"].height
        assert set(annotated["shard_id"]) == set(found["manifest_shards"]["shard_id"])
        assert found["anchors"].join(annotated, on=["shard_id", "key"]).height == found["anchors"].height > 0
        used = annotated.select(pl.col("anchor_key_i2t").drop_nulls().str.splitn("/", 2).struct.field("field_0"))
        assert set(used.to_series()) <= set(annotated["shard_id"])
        assert found["renamed"].height > 0  # conftest's extra shard repeats a key of 00000.tar
        assert found["renamed"].join(annotated, on=["shard_id", "key"]).height == found["renamed"].height


def test_the_summary_prints_the_estimates_and_why_no_uids(two_runs):
    for stdout, out in two_runs:
        manifest = json.loads((out / "manifest.json").read_text())
        annotated = pl.read_parquet(out / "annotated" / "*.parquet").to_arrow()
        assert manifest["estimates"] == pytest.approx(estimates.of_table(annotated), abs=1e-6)
        # from the sums each shard's write recorded, not by reading the annotated files again
        assert all("estimate_sums" in json.loads(p.read_text()) for p in (out / "results").glob("*.json"))
        assert manifest["estimates"]["scored"] == annotated.num_rows - manifest["counts"]["errors"]
        assert manifest["estimates"]["clean_lost"] == 0.0  # nothing scored was dropped
        assert estimates.describe(manifest["estimates"]) in " ".join(stdout.split())
        # tiny_shards' samples carry no uid: the summary says so instead of leaving the file silently out
        assert manifest["keep_uids"].startswith(f"not written: {manifest['counts']['kept']} of ")
        assert f"keep_uids {manifest['keep_uids']}" in " ".join(stdout.split())


def test_stats_call_rule_drops_dropped_and_only_unreadable_samples_failed(two_runs):
    for _, out in two_runs:
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        stats = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*_stats.json"))]
        assert stats and all(s["count"] == s["successes"] + s["dropped"] + s["failed"] for s in stats)
        # img2dataset's `failed`: a sample that could not be had (here: read or decoded), never a dropped pair
        assert sum(s["failed"] for s in stats) == counts["errors"] > 0
        assert sum(s["dropped"] for s in stats) == counts["dropped"]
