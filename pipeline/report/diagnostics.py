"""The loss-mixture view: each network's normalised per-pair loss over a seeded sample of ok rows, and its fitted
mixture on a grid. Needs the run's checkpoint; without one (a distributed finalize) there is nothing to draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.fit import sample_positions
from bicro_clean.pipeline.fit_sample import file_pairs, read_footers
from bicro_clean.pipeline.layout import embedding_path
from bicro_clean.pipeline.parallel_io import imap
from bicro_clean.pipeline.parquet_io import join
from bicro_clean.pipeline.report.scan import HIST_BINS
from bicro_clean.pipeline.score import local_checkpoint

LOSS_SAMPLE = 20_000
LOSS_BATCH = 8_192  # sampled rows scored per call: each call embeds the negative bank once


def checkpoint_dir(config: CleanConfig, manifest: dict[str, Any]) -> str | None:
    """The run's checkpoint folder as the manifest records it, or None (a distributed finalize has none)."""
    path = (manifest.get("checkpoint") or {}).get("path")
    return join(config.output, path) if path else None


@dataclass
class LossView:
    """One network's normalised-loss histogram (as a density) and its fitted mixture on a grid."""

    edges: np.ndarray
    density: np.ndarray
    grid: np.ndarray
    clean_pdf: np.ndarray
    noisy_pdf: np.ndarray
    noisy_weight: float
    clean_mean: float


@dataclass
class LossDiagnostics:
    """Every network's view, the sample size they were drawn from, and the mixture family (gmm or bmm)."""

    views: list[LossView]
    sample: int
    division: str

    @property
    def noisy_weight(self) -> float:
        return float(np.mean([v.noisy_weight for v in self.views]))


def _exists(path: str) -> bool:
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    return fs.exists(local)


def sample_losses(model: Any, paths: list[str], sample: int, seed: int) -> list[np.ndarray]:
    """Normalised losses per network for a seeded uniform sample of ok rows.

    The rows are read as the fit reads its sample (pipeline.fit_sample): each file's ok count from its footer,
    then only the row groups that hold sampled rows, so the cost follows the sample, not the crawl. Sampled rows
    are gathered across files into batches of LOSS_BATCH rows before scoring: every call embeds the negative bank
    again and pads its rows to a whole forward chunk. Memory stays bounded by one batch and the files in flight."""
    # The models are imported here, not at the top: a report without a checkpoint never needs them.
    from bicro_clean.models.diagnostics import normalised_losses

    footers = read_footers(paths)
    wanted = [(f, p) for f, p in zip(footers, sample_positions([f.ok for f in footers], sample, seed)) if len(p)]
    parts: list[list[np.ndarray]] = []
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        if pending:
            image = np.concatenate([i for i, _ in pending])
            text = np.concatenate([t for _, t in pending])
            parts.append(normalised_losses(model, image, text))
            pending.clear()

    for image, text, _ in imap(lambda item: file_pairs(*item), wanted):
        pending.append((image, text))
        if sum(len(i) for i, _ in pending) >= LOSS_BATCH:
            flush()
    flush()
    return [np.concatenate([p[k] for p in parts]) for k in range(len(model.nets))] if parts else []


def loss_view(mixture: Any, losses: np.ndarray) -> LossView:
    from bicro_clean.models.diagnostics import mixture_density

    lo, hi = min(0.0, float(losses.min())), max(1.0, float(losses.max()))
    counts, edges = np.histogram(losses, bins=HIST_BINS, range=(lo, hi))
    density = counts / max(counts.sum() * (edges[1] - edges[0]), 1e-12)
    grid = np.linspace(lo, hi, 241)[1:-1]  # open interval: a Beta density can be infinite at 0 and 1
    clean_pdf, noisy_pdf = mixture_density(mixture, grid)
    clean_mean = float(mixture.means()[mixture.clean_component()])
    return LossView(edges, density, grid, clean_pdf, noisy_pdf, float(mixture.noisy_weight()), clean_mean)


def loss_diagnostics(config: CleanConfig, manifest: dict[str, Any]) -> LossDiagnostics | None:
    """The fitted mixtures over a loss sample, or None without a checkpoint (a distributed finalize)."""
    checkpoint = checkpoint_dir(config, manifest)
    paths = [p for p in (embedding_path(config.output, i["url"]) for i in manifest.get("inputs", [])) if _exists(p)]
    if checkpoint is None or not paths:
        return None
    from bicro_clean.models.bicro import BiCroModel

    with local_checkpoint(checkpoint) as local:
        model = BiCroModel.load(local, device="cpu")  # CPU: the same bytes on every machine
    losses = sample_losses(model, paths, LOSS_SAMPLE, config.bicro.seed)
    if not losses or not len(losses[0]):
        return None
    views = [loss_view(m, x) for m, x in zip(model.mixtures, losses)]
    return LossDiagnostics(views, len(losses[0]), str(model.params.division))
