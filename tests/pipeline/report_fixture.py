"""A small run's outputs for the report tests (test_report.py, test_report_browser.py), written directly.

Real shards (make_shards: coloured images, 25% caption noise, truth_clean in each sample's JSON, captions with
markup the report must escape) and annotated Parquet files with the schema the write stage produces, but with
synthetic, seeded scores that follow the truth (and the `noise_kind` column of benchmark shards): clean_score
(float64, no ties), the float32 BiCro columns and, for an aligned encoder, encoder_cosine (all null otherwise). Decisions follow the run's rule exactly as the
select stage applies it: column >= threshold (reason low_<column>), or the top keep_fraction ranked by the column
with ties by (shard, key) (reason below_keep_fraction). One reader error row (decode_error) per run.

The report only reads these files, the manifest and the shards, so it can be tested without fitting a model:
without a checkpoint in the manifest the loss-mixture plots are left out (test_report.py's whole-run test draws
them).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import image_folder, tiny_config
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.make_shards import make_shards
from bicro_clean.pipeline.report import write_report
from bicro_clean.pipeline.shards import RawSample, shard_id
from bicro_clean.pipeline.tar_reader import iter_shard

FLOAT32 = ("p_clean", "consistency", "r_i2t", "r_t2i", "soft_label", "match_score", "encoder_cosine")


@dataclass(frozen=True)
class Options:
    """What kind of run to write."""

    truth: bool = True  # truth_clean known (benchmark shards); False: the column is all null
    aligned: bool = True  # encoder_cosine has values (open_clip); False: all null
    clean_score: bool = True  # False: a run from before clean_score existed (no such column)
    column: str = "clean_score"
    keep_fraction: float | None = 0.5
    threshold: float = 0.5
    images: int = 16  # x 2 captions = pairs
    seed: int = 0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def synthetic_scores(truth: np.ndarray, rng: np.random.Generator, options: Options) -> dict[str, np.ndarray]:
    """Scores that rank truly clean pairs higher, imperfectly (so AUROCs are below 1 and rankings differ)."""
    sign = np.where(truth, 1.0, -1.0)
    n = len(truth)
    p_clean = _sigmoid(1.2 * sign + rng.normal(0, 1.0, n))
    consistency = rng.uniform(0, 1, n) * np.where(truth, 1.0, 0.6)
    soft = np.where(p_clean > 0.5, 0.5 + consistency / 2, np.where(consistency <= 0.1, 0.0, consistency))
    scores = {"p_clean": p_clean, "consistency": consistency, "soft_label": soft,
              "r_i2t": np.clip(consistency + rng.normal(0, 0.05, n), 0, 1),
              "r_t2i": np.clip(consistency + rng.normal(0, 0.05, n), 0, 1),
              "match_score": np.clip(0.3 * sign + rng.normal(0, 0.3, n), -1, 1),
              "encoder_cosine": np.clip(0.15 + 0.08 * sign + rng.normal(0, 0.08, n), -1, 1)
              if options.aligned else np.full(n, np.nan)}
    if options.clean_score:
        scores["clean_score"] = _sigmoid(1.0 * sign + rng.normal(0, 1.5, n))
    return scores


def _read_shard(url: str, config: CleanConfig) -> list[dict[str, Any]]:
    out = []
    for item in iter_shard(url, config.reader):
        if isinstance(item, RawSample):
            meta = json.loads(item.members["json"])
            out.append({"shard": url, "key": item.key, "caption": item.members["txt"].decode("utf-8").strip(),
                        "truth": bool(meta["truth_clean"]), "kind": meta.get("noise_kind")})
    return out


def decide(values: np.ndarray, shards: list[str], keys: list[str],
           options: Options) -> tuple[list[str], list[str], dict[str, Any] | None]:
    """decision and reason per row (NaN = reader error), and the cutoff the manifest records for keep_fraction."""
    column, scored = options.column, np.flatnonzero(~np.isnan(values))
    if options.keep_fraction is None:
        keep = ~np.isnan(values) & (values >= options.threshold)
        drop_reason, cutoff = f"low_{column}", None
    else:
        order = sorted(scored, key=lambda i: (-values[i], shards[i], keys[i]))
        n_keep = math.floor(options.keep_fraction * len(scored) + 1e-9)
        keep = np.zeros(len(values), dtype=bool)
        keep[order[:n_keep]] = True
        last = order[n_keep - 1]
        cutoff = {"n_keep": n_keep, "n_scored": len(scored), "value": float(values[last]), "shard": shards[last],
                  "key": keys[last]}
        drop_reason = "below_keep_fraction"
    decision = ["error" if math.isnan(v) else "keep" if k else "drop" for v, k in zip(values, keep)]
    reason = [{"error": "decode_error", "keep": "kept", "drop": drop_reason}[d] for d in decision]
    return decision, reason, cutoff


def _annotated(rows: list[dict[str, Any]], scores: dict[str, np.ndarray], decision: list, reason: list,
               options: Options) -> pa.Table:
    sids = [shard_id(r["shard"]) for r in rows]
    clean = [f"{sids[i]}/{r['key']}" for i, r in enumerate(rows) if r.get("truth")]  # the anchors
    error = [r.get("truth") is None for r in rows]
    columns: dict[str, pa.Array] = {
        "shard": pa.array([r["shard"] for r in rows]), "key": pa.array([r["key"] for r in rows]),
        "output_key": pa.array([None if e else r["key"] for r, e in zip(rows, error)], pa.string()),
        "output_shard": pa.array([None] * len(rows), pa.string()),
        "decision": pa.array(decision), "reason": pa.array(reason),
        "detail": pa.array([None] * len(rows), pa.string()),
        "caption": pa.array([r.get("caption") for r in rows], pa.string()),
    }
    for name in FLOAT32:
        columns[name] = pa.array(scores[name].astype(np.float32), pa.float32(), from_pandas=True)
    if "clean_score" in scores:
        columns["clean_score"] = pa.array(scores["clean_score"], pa.float64(), from_pandas=True)
    for k, name in enumerate(("anchor_key_i2t", "anchor_key_t2i")):
        columns[name] = pa.array([None if e else clean[(i + k) % len(clean)] for i, e in enumerate(error)],
                                 pa.string())
    columns["truth_clean"] = pa.array([r.get("truth") if options.truth else None for r in rows], pa.bool_())
    columns["noise_kind"] = pa.array([r.get("kind") if options.truth else None for r in rows], pa.string())
    return pa.table(columns)


def build_run(root: Path, options: Options = Options()) -> Path:
    """Shards under root/data, outputs (annotated/, manifest.json, report.html) under root/out; returns out."""
    data, out = root / "data", root / "out"
    images, captions = image_folder(data, options.images, (40, 30),
                                    lambda i: [f"a picture number {i}", f"colour {i} <b>&"])
    make_shards(images, captions, data / "shards", shard_size=12, noise_rate=0.25)
    select = {"column": options.column, "threshold": options.threshold, "keep_fraction": options.keep_fraction}
    config = tiny_config(str(data / "shards" / "*.tar"), out, select=select)
    urls = sorted(str(p) for p in (data / "shards").glob("*.tar"))
    rows = [row for url in urls for row in _read_shard(url, config)]
    rows.insert(1, {"shard": urls[0], "key": "broken"})  # a reader error: no caption, no scores, no truth
    rng = np.random.default_rng(options.seed)
    scores = synthetic_scores(np.array([bool(r.get("truth")) for r in rows]), rng, options)
    for values in scores.values():
        values[1] = np.nan
    decision, reason, cutoff = decide(scores[options.column], [r["shard"] for r in rows],
                                      [r["key"] for r in rows], options)
    table = _annotated(rows, scores, decision, reason, options)
    outputs = []
    (out / "annotated").mkdir(parents=True)
    for url in urls:
        part = table.filter(pc.equal(table["shard"], url))
        path = f"annotated/{shard_id(url)}.parquet"
        pq.write_table(part, out / path)
        outputs.append({"path": path, "kind": "annotated", "count": part.num_rows})
    counts = {"in": len(rows), "kept": decision.count("keep"), "dropped": decision.count("drop"),
              "errors": decision.count("error"), "by_reason": {r: reason.count(r) for r in sorted(set(reason))}}
    manifest = {"package_version": "test", "config_hash": "fixture", "checkpoint": None,
                "config": config.model_dump(mode="json", exclude={"output": True}), "cutoff": cutoff,
                "inputs": [{"url": u, "shard_id": shard_id(u)} for u in urls], "outputs": outputs,
                "counts": counts, "renamed_keys": []}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    write_report(config, str(out / "manifest.json"))
    return out


def config_of(out: Path) -> CleanConfig:
    """The run's config as the manifest records it (what the report itself reads)."""
    manifest = json.loads((out / "manifest.json").read_text())
    return CleanConfig.model_validate({**manifest["config"], "output": str(out)})


def slider_data(page: str) -> dict:
    """The threshold slider's inline JSON."""
    found = re.search(r'<script type="application/json" id="threshold-data">(.*?)</script>', page, re.S)
    assert found, "no slider data in the page"
    return json.loads(found.group(1))


# ---------------------------------------------------------------- headless Chromium (report browser tests)

BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update", "--disable-sync")


def chromium() -> str:
    """The chromium binary on PATH; skips the calling test when there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium binary on PATH (chromium, chromium-browser, google-chrome): "
                "apt-get install -y chromium to run the browser tests")


def dump_dom(page: Path, profile: Path) -> str:
    """The DOM of a local HTML file after its scripts ran (file://, no network), as Chromium serialises it."""
    done = subprocess.run([chromium(), *BROWSER_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout
