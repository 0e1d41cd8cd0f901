"""Fit stage: the run's embedding Parquet files -> a fitted BiCro checkpoint folder.

BiCro is fitted on every ok pair or on a seeded uniform sample of `bicro.fit_sample` pairs across all shards, so
the fit costs the same at 100k or 100M pairs; every pair is scored afterwards either way (pipeline.score).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

import fsspec
import numpy as np

from bicro_clean.pipeline import progress, resume
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.fit_sample import Footer, read_footers, read_sample
from bicro_clean.pipeline.layout import checkpoint_path
from bicro_clean.pipeline.parallel_io import pmap
from bicro_clean.pipeline.parquet_io import atomic_output, digest, join, package_version
from bicro_clean.pipeline.score import CHECKPOINT_FILES, device, encoder_info

logger = logging.getLogger(__name__)

FIT_SAMPLE_STREAM = 0x5A3B1E  # any constant no other seeded draw uses
HELD_OUT_STREAM = 0x4E1D07  # the held-out calibration pairs' draw
# Pairs outside the fit sample that calibrate clean_score on a large crawl: the calibration fits 6 weights, and
# its clean-share estimate has a standard error under 0.005 at this size.
HELD_OUT_PAIRS = 16_384


def fit_key(config: CleanConfig, embedding_paths: list[str], footers: list[Footer] | None = None) -> str:
    metas = [f.meta for f in footers] if footers is not None else pmap(encoder_info, embedding_paths)
    return resume.stage_key([m.get(resume.KEY) for m in metas], config.bicro.model_dump(mode="json"),
                            package_version())


def sample_positions(counts: list[int], sample: int, seed: int) -> list[np.ndarray]:
    """Per file, the positions among its ok rows to fit on: all, or a seeded uniform sample over the run."""
    total = sum(counts)
    if sample == 0 or sample >= total:
        return [np.arange(c) for c in counts]
    # A stream of its own: with default_rng(seed) the sample was the first `sample` of the same permutation that
    # pipeline.noise draws with that seed, so a benchmark's fit sample held every injected noisy pair.
    chosen = np.sort(np.random.default_rng((seed, FIT_SAMPLE_STREAM)).choice(total, size=sample, replace=False))
    bounds = np.cumsum([0, *counts])
    return [chosen[(chosen >= lo) & (chosen < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def held_out_positions(counts: list[int], sample: int, seed: int) -> list[np.ndarray] | None:
    """Per file, positions of up to HELD_OUT_PAIRS ok pairs OUTSIDE the fit sample, or None when the crawl is less
    than twice the sample (most pairs are then fit pairs, and the fit cross-fits its calibration instead).

    Drawn by rejection from a stream of its own, so no array of the crawl's size is ever made (10^9 pairs)."""
    total = sum(counts)
    if sample == 0 or total < 2 * sample:
        return None
    fitted = np.concatenate([p + lo for p, lo in zip(sample_positions(counts, sample, seed), np.cumsum([0, *counts]))])
    want, rng, chosen = min(HELD_OUT_PAIRS, total - sample), np.random.default_rng((seed, HELD_OUT_STREAM)), set()
    while len(chosen) < want:
        draw = rng.integers(0, total, size=2 * (want - len(chosen)))
        spot = np.minimum(np.searchsorted(fitted, draw), len(fitted) - 1)
        chosen.update(int(x) for x in draw[fitted[spot] != draw])
    picked = np.sort(np.fromiter(chosen, dtype=np.int64))[:want]
    bounds = np.cumsum([0, *counts])
    return [picked[(picked >= lo) & (picked < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def _pairs(footers: list[Footer], positions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    parts = read_sample(footers, positions)
    image = np.concatenate([p[0] for p in parts]).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
    text = np.concatenate([p[1] for p in parts]).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
    return image, text, [k for p in parts for k in p[2]]


def load_fit_pairs(embedding_paths: list[str], sample: int, seed: int,
                   footers: list[Footer] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image/text embeddings and run-wide keys of the ok pairs BiCro is fitted on, in file then row order.
    Only the sampled rows' row groups are read (pipeline.fit_sample)."""
    footers = footers if footers is not None else read_footers(embedding_paths)
    image, text, keys = _pairs(footers, sample_positions([f.ok for f in footers], sample, seed))
    if len(keys) < 2:
        raise ValueError("fewer than 2 usable pairs to fit BiCro on (every sample failed to read?)")
    return image, text, keys


def load_held_out(footers: list[Footer], sample: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(image, text) of the held-out pairs clean_score is calibrated on, or None (see held_out_positions)."""
    positions = held_out_positions([f.ok for f in footers], sample, seed)
    if positions is None:
        return None
    image, text, _ = _pairs(footers, positions)
    return image, text


def run_encoder(embedding_paths: list[str], footers: list[Footer] | None = None) -> dict[str, Any]:
    """The encoder every embedding file was made with; mixing encoders in one run is an error."""
    metas = [f.meta for f in footers] if footers is not None else pmap(encoder_info, embedding_paths)
    described = (meta["encoder"] for meta in metas)  # one metadata read per file
    encoders = {digest(encoder): encoder for encoder in described}
    if len(encoders) != 1:
        raise ValueError(f"embedding files come from {len(encoders)} different encoders; re-embed with one")
    return next(iter(encoders.values()))


def save_checkpoint(model: Any, path: str) -> None:
    """`model.save` into local scratch, then copy file by file, each atomically, model.json last.

    The folder name carries the fit key and `model.json` marks it complete, so a crash mid-copy leaves a folder
    that `resume.folder_is_complete` rejects and the next run refits into.
    """
    with tempfile.TemporaryDirectory() as scratch:
        model.save(scratch)
        for name in CHECKPOINT_FILES:
            with atomic_output(join(path, name)) as tmp, fsspec.open(tmp, "wb") as dst, \
                    open(os.path.join(scratch, name), "rb") as src:
                shutil.copyfileobj(src, dst)


def fit_stage(config: CleanConfig, embedding_paths: list[str]) -> str:
    """Fit BiCro on all ok pairs (or a `bicro.fit_sample` sample); skipped when this exact fit exists."""
    from bicro_clean.models.params import BiCroParams
    from bicro_clean.models.train import fit_bicro, fit_epochs

    footers = read_footers(embedding_paths)  # one footer read per file, in parallel: keys, counts, row groups
    path = checkpoint_path(config.output, fit_key(config, embedding_paths, footers))
    if resume.folder_is_complete(path, CHECKPOINT_FILES):
        logger.info("fit: reusing %s", path)
        return path
    image, text, keys = load_fit_pairs(embedding_paths, config.bicro.fit_sample, config.bicro.seed, footers)
    params = BiCroParams(**config.bicro.model_dump(exclude={"fit_sample"}))
    aligned = bool(run_encoder(embedding_paths, footers).get("aligned"))
    held_out = load_held_out(footers, config.bicro.fit_sample, config.bicro.seed)
    logger.info("fit: %d pairs on %s (aligned encoder: %s), clean_score calibrated on %s", len(keys), device(),
                aligned, f"{len(held_out[0])} held-out pairs" if held_out else "out-of-fold evidence")
    progress.report("fit", total=fit_epochs(params, len(keys), held_out is not None), items=len(keys))
    model, _ = fit_bicro(image, text, params, keys=keys, aligned=aligned, device=device(),
                         on_epoch=lambda epoch, info: progress.report("fit", advance=1), held_out=held_out)
    save_checkpoint(model, path)
    return path
