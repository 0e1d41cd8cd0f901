"""`bicro-clean demo`: the main job end to end, offline, with known injected noise, on a fresh clone.

Without `--data` it draws its own captioned scenes (lab.demo_data: no download, no workspace folder), injects the
NCR caption noise (pipeline.noise, via make_shards), runs the whole pipeline with the default settings and prints
how well the scores found the noise it injected. `--data DIR` takes any folder in the ``images/ + captions.csv``
layout instead (e.g. Flickr8k from `bicro-clean fetch flickr8k`; with a splits.json, its train split).
The lab never imports the CLI: the CLI hands in its own `run` (the default runner).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from bicro_clean.lab.demo_data import generate
from bicro_clean.lab.metrics import auroc
from bicro_clean.pipeline.config import CleanConfig, merge_overrides
from bicro_clean.pipeline.make_shards import make_shards

logger = logging.getLogger(__name__)

DEMO_SCENES = 1000  # x 2 captions = 2,000 pairs: the whole demo in about a minute on 2 CPU cores
CAPTIONS_PER_IMAGE = 2
DATA_IMAGES = 400  # with --data: Flickr8k has 5 captions per image, so 2,000 pairs as well
SHARD_SIZE = 500  # 4 shards: the default runner's two embed streams get two each (one shard = one decode worker)
SUMMARY_FILE = "demo-summary.json"


class DemoError(ValueError):
    """Bad demo input (a folder without captions.csv): the CLI prints it on one line and exits 2."""


def _truth_summary(annotated_glob: str) -> dict[str, Any]:
    """How well the scores and the keep decision match the injected ground truth (only the demo knows it)."""
    scan = pl.scan_parquet(annotated_glob)
    scores = ["clean_score", "soft_label"]
    frame = scan.filter(pl.col("decision") != "error").select("decision", "truth_clean", *scores).collect()
    kept = frame["decision"] == "keep"
    clean = frame["truth_clean"].fill_null(True)
    true_kept, noisy = int((kept & clean).sum()), int((~clean).sum())
    summary: dict[str, Any] = {
        "scored": frame.height,
        "kept": int(kept.sum()),
        "dropped": int((~kept).sum()),
        "true_noise_rate": round(1 - float(clean.mean()), 4),
        "precision_of_kept": round(true_kept / max(1, int(kept.sum())), 4),
        "recall_of_clean": round(true_kept / max(1, int(clean.sum())), 4),
        "noise_recall": round(int((~kept & ~clean).sum()) / max(1, noisy), 4),
    }
    summary["mean_clean_score"] = round(float(frame["clean_score"].mean()), 4)
    for column in scores:
        summary[f"auroc_{column}"] = round(auroc(frame[column].fill_null(0.0).to_numpy(), clean.to_numpy()), 4)
    return summary


def _prepare(data: Path | None, work: Path, images: int | None, noise_rate: float, seed: int) -> dict[str, Any]:
    """Shards under work/shards from the generated scenes or from `data`; make_shards' summary plus the source."""
    if data is None:
        data = work / "data"
        generate(data, scenes=images or DEMO_SCENES, captions_per_image=CAPTIONS_PER_IMAGE, seed=seed)
        source, limit = f"{images or DEMO_SCENES} generated scenes", None
    else:
        if not (data / "captions.csv").is_file() or not (data / "images").is_dir():
            raise DemoError(f"demo data not found: {data} needs images/ and captions.csv")
        source, limit = str(data), images or DATA_IMAGES
    splits = data / "splits.json"
    made = make_shards(data / "images", data / "captions.csv", work / "shards", shard_size=SHARD_SIZE,
                       split_file=splits if splits.exists() else None, split="train" if splits.exists() else None,
                       noise_rate=noise_rate, noise_seed=seed, limit_images=limit)
    return {**made, "source": source, "data": str(data)}


def run_demo(out: Path, run: Callable[[CleanConfig], dict[str, Any]], data: Path | None = None,
             images: int | None = None, noise_rate: float = 0.4, seed: int = 0,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Data (generated, or `data`) with `noise_rate` of captions shuffled -> shards -> `run(config)` (the whole
    pipeline; default settings plus `overrides`, dotted keys) -> the demo's summary, also written to
    out/demo-summary.json with the run's own summary."""
    started = time.perf_counter()
    # the demo remakes its shards and owns out/clean: a rerun with other settings replaces it (--overwrite)
    base = {"input": str(out / "shards" / "*.tar"), "output": str(out / "clean"), "out": {"overwrite": True}}
    # the config first: a bad flag (an unknown encoder) is refused before minutes of drawing scenes
    config = CleanConfig.model_validate(merge_overrides(base, overrides or {}))
    made = _prepare(data, out, images, noise_rate, seed)
    run_summary = run(config)
    truth = _truth_summary(str(out / "clean" / "annotated" / "*.parquet"))
    summary = {"source": made["source"], "data": made["data"], "pairs": made["samples"],
               "noise_injected": made["noisy"], "noise_rate": noise_rate, **truth,
               "report": run_summary.get("report"), "seconds": round(time.perf_counter() - started, 1),
               "summary_file": str(out / SUMMARY_FILE)}
    (out / SUMMARY_FILE).write_text(json.dumps({"demo": summary, "run": run_summary}, indent=2, default=str))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines `bicro-clean demo` prints."""
    pairs, kept, noisy = summary["pairs"], summary["kept"], summary["noise_injected"]
    lines = [
        f"pairs:           {pairs:,} ({summary['source']})",
        f"noise injected:  {noisy:,} captions shuffled ({noisy / max(1, pairs):.1%})",
        f"noise found:     {summary['dropped']:,} pairs dropped ({summary['dropped'] / max(1, pairs):.1%}), "
        f"{summary['noise_recall']:.1%} of the injected noise",
        f"AUROC clean_score vs injected truth: {summary['auroc_clean_score']:.4f} "
        f"(soft_label {summary['auroc_soft_label']:.4f})",
        f"mean clean_score: {summary['mean_clean_score']:.3f} (estimated clean share; truly clean: "
        f"{1 - summary['true_noise_rate']:.3f})",
    ]
    lines += [
        f"kept precision:  {summary['precision_of_kept']:.1%} of {kept:,} kept pairs are truly clean",
        f"report:          {summary['report']}",
        f"took {summary['seconds']:.0f} s; details in {summary['summary_file']}",
    ]
    return "\n".join(lines)
