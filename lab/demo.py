"""`bicro-clean demo`: the main job end to end, offline, on real photos with known injected noise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl

from bicro_clean.lab.metrics import auroc
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.make_shards import make_shards
from bicro_clean.pipeline.run import run_pipeline

logger = logging.getLogger(__name__)


def _truth_summary(annotated_glob: str) -> dict[str, float]:
    """How well the keep decision matches the injected ground truth (only the demo knows it)."""
    frame = pl.scan_parquet(annotated_glob).filter(pl.col("decision") != "error").select(
        "decision", "truth_clean", "soft_label").collect()
    kept = frame["decision"] == "keep"
    clean = frame["truth_clean"].fill_null(True)
    true_kept = int((kept & clean).sum())
    return {
        "true_noise_rate": round(1 - float(clean.mean()), 4),
        "kept_fraction": round(float(kept.mean()), 4),
        "precision_of_kept": round(true_kept / max(1, int(kept.sum())), 4),
        "recall_of_clean": round(true_kept / max(1, int(clean.sum())), 4),
        "auroc_soft_label": round(auroc(frame["soft_label"].to_numpy(), clean.to_numpy()), 4),
    }


def run_demo(data: Path, out: Path, images: int, noise_rate: float) -> str:
    """Flickr8k training photos with `noise_rate` of captions mismatched -> shards -> the whole run -> its
    summary (JSON) with how the keep decision matched the injected truth."""
    if not (data / "captions.csv").exists():
        raise SystemExit(f"demo data not found: {data}/captions.csv (pass --data DIR with images/ and captions.csv)")
    splits = data / "splits.json"
    make_shards(data / "images", data / "captions.csv", out / "shards", shard_size=500,
                split_file=splits if splits.exists() else None, split="train" if splits.exists() else None,
                noise_rate=noise_rate, noise_seed=0, limit_images=images)
    config = CleanConfig(input=str(out / "shards" / "*.tar"), output=str(out / "clean"))
    summary = run_pipeline(config)
    summary["against_injected_truth"] = _truth_summary(str(out / "clean" / "annotated" / "*.parquet"))
    return json.dumps(summary, indent=2)
