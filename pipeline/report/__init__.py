"""A self-contained HTML report of one cleaning run: `OUTPUT/report.html`.

Everything is inlined (CSS, SVG plots, thumbnails as base64 JPEG data URIs), so the file can be mailed around or
opened offline. The bytes depend only on the run's outputs: no timestamps, seeded sampling, sorted iteration and
fixed number formatting, so rerunning a cached run rewrites the same file.

The selection column (select.column, clean_score by default) is the page's main column: the headline AUROC, the
main histogram, the galleries' ranking and the slider's starting column.

Without labels the page still says what a threshold buys, from clean_score (a calibrated P(clean)): the expected
precision of the kept pairs, the expected clean pairs lost and the run's one noise estimate (1 - mean clean_score,
as pipeline/estimates.py defines it for the run summary and the manifest).

Memory stays bounded by one shard: histograms and gallery picks are aggregated per annotated file, the loss
sample is scored per embeddings file, and thumbnails are cut while streaming only the shards that hold them.
The per-row scan can run mapped over groups of annotated files (`report_plan`, then `report_scan` per group, then
`write_report` given the partials): the merge is exact, so the page is the same bytes however the files were
grouped.

    scan         the selection rule as applied; histograms, per-shard counts and gallery picks
    threshold    per score column: fine histograms (with truth), clean_score sums per bin and example pairs, for
                 choosing a threshold
    buys         what a threshold buys without labels: the one noise estimate, whether the threshold matters
    commands     the `bicro-clean run` / `select` commands a slider position stands for
    kinds        detection per noise kind (a noise_kind column)
    compare      clean_score next to an aligned encoder's cosine: Spearman and kept-set overlap on a seeded sample
    slider       the threshold slider: inline JSON data and an inline script (no network, no library)
    diagnostics  the fitted loss mixtures over a seeded loss sample (needs the run's checkpoint)
    thumbnails   gallery and anchor images cut from the input shards
    gallery      the pair cards and gallery sections
    text         escaping and the stat card
    svg          a small deterministic SVG plotting library
    plots        the report's plots, drawn with it
    page         the HTML page, styled by report.css

The report reads the manifest, the output layout and the stage modules, never pipeline.run (which calls it).
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.layout import REPORT
from bicro_clean.pipeline.manifest_shards import with_shards
from bicro_clean.pipeline.parquet_io import atomic_output, join
from bicro_clean.pipeline.report.diagnostics import loss_diagnostics
from bicro_clean.pipeline.report.page import render_page
from bicro_clean.pipeline.report.scan import (Rule, ScanPartial, ScanSetup, annotated_paths, merge_scans,
                                              scan_annotated, scan_files, scan_setup)
from bicro_clean.pipeline.report.threshold import example_rows
from bicro_clean.pipeline.report.thumbnails import fetch_thumbnails, shard_urls
from bicro_clean.pipeline.writers import read_json

__all__ = ["build_report", "report_plan", "report_scan", "write_report"]
Scans = tuple[ScanSetup, list[ScanPartial]]  # the setup and every group's partial, in file order

logger = logging.getLogger(__name__)


def _manifest(config: CleanConfig, manifest_path: str) -> dict[str, Any]:
    manifest = with_shards(read_json(manifest_path), config.output)  # inputs and outputs from the shards table
    if not isinstance(manifest, dict):
        raise FileNotFoundError(f"no readable manifest at {manifest_path}")
    return manifest


def report_plan(config: CleanConfig, manifest_path: str) -> tuple[list[str], ScanSetup]:
    """The annotated files to scan, and what every group's scan needs (the rule, seed and bin ranges)."""
    manifest = _manifest(config, manifest_path)
    paths = annotated_paths(config, manifest)
    return paths, scan_setup(paths, Rule.from_run(config, manifest), config.bicro.seed)


def report_scan(paths: list[str], setup: ScanSetup) -> ScanPartial:
    """The report's per-row work over one group of annotated files: a small partial."""
    return scan_files(paths, setup)


def write_report(config: CleanConfig, manifest_path: str, scans: Scans | None = None) -> str:
    """Write `OUTPUT/report.html` atomically from the run's manifest and outputs; returns its path. `scans`: the
    groups' partials from `report_scan` (without them the files are scanned here, in one pass)."""
    page = build_report(config, _manifest(config, manifest_path), scans)
    path = join(config.output, REPORT)
    with atomic_output(path) as tmp, fsspec.open(tmp, "wb") as fh:
        fh.write(page.encode("utf-8"))
    logger.info("report: wrote %s (%d KB)", path, len(page) // 1024)
    return path


def build_report(config: CleanConfig, manifest: dict[str, Any], scans: Scans | None = None) -> str:
    """The whole HTML page as a string."""
    rule = Rule.from_run(config, manifest)
    if scans is None:
        stats, picks = scan_annotated(annotated_paths(config, manifest), rule, config.bicro.seed)
    else:
        stats, picks = merge_scans(*scans)
    losses = loss_diagnostics(config, manifest)
    small: dict[str, set[str]] = {}
    for row in example_rows(stats.bins):  # the threshold slider's example pairs, cut small
        small.setdefault(str(row["shard"]), set()).add(str(row["key"]))
    thumbs = fetch_thumbnails(shard_urls(manifest, picks), config, small)
    return render_page(config, manifest, rule, stats, picks, losses, thumbs)
