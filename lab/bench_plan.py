"""The bench suite's plan: every size `bicro-clean bench` runs each stage at, for --quick, the full run and the
test's tiny run (`make_plan`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

VIT = "open_clip:ViT-B-32"  # random init: speed does not depend on the weights
OVERHEAD_PAIRS = 100_000


@dataclass
class Plan:
    """Every size the suite runs at; `make_plan` picks them for --quick, the full run, or the test's tiny run."""

    device: str
    decode_pairs: int
    decode_workers: list[int]
    decode_transform: str
    embed_pairs: dict[str, int]  # per device
    embed_encoders: dict[str, list[str]]  # per device
    embed_batches: dict[str, list[int]]  # per device
    embed_workers: dict[str, int]
    fit_sizes: list[int]  # the default anchor search ("auto") at each size; fit_sample is added by make_plan
    fit_batch: dict[str, int]
    score_anchors: list[int]
    score_kinds: list[str]  # anchor searches measured at each anchor count ("auto" = the default's choice)
    score_pairs: int
    shard_pairs: int
    shard_counts: list[int]
    overhead_pairs: int = OVERHEAD_PAIRS
    fit_sample: int = 0  # the pipeline's default bicro.fit_sample: what fitting costs for overhead_pairs input pairs
    image_size: tuple[int, int] = (500, 375)  # Flickr8k's typical photo
    isolate: bool = True  # each stage in a fresh process (its own peak RSS); off for the test's tiny run
    notes: list[str] = field(default_factory=list)

    @property
    def overhead_fit_pairs(self) -> int:
        """Pairs the default configuration fits on for overhead_pairs input pairs (fit_sample 0 = all of them)."""
        return min(self.fit_sample or self.overhead_pairs, self.overhead_pairs)


def make_plan(quick: bool, tiny: bool = False, cuda: bool | None = None) -> Plan:
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    cores = os.cpu_count() or 1
    devices = ["cpu", "cuda"] if cuda else ["cpu"]
    if tiny:  # the test's end-to-end run: every code path, seconds
        return Plan(device="cpu", decode_pairs=16, decode_workers=[0, 1], decode_transform="tiny",
                    embed_pairs={"cpu": 16}, embed_encoders={"cpu": ["tiny"]}, embed_batches={"cpu": [8]},
                    embed_workers={"cpu": 1}, fit_sizes=[300, 600], fit_batch={"cpu": 64},
                    score_anchors=[200], score_kinds=["flat", "ivf"], score_pairs=128, shard_pairs=64,
                    shard_counts=[1, 2],
                    overhead_pairs=1000, fit_sample=600, image_size=(64, 48), isolate=False)
    workers = sorted({0, 2, min(cores, 8), cores})
    sample = default_fit_sample()
    plan = Plan(
        device="cuda" if cuda else "cpu",
        decode_pairs=4096 if cuda else (512 if quick else 1024),
        decode_workers=workers,
        decode_transform=VIT,
        # CPU embedding is slow (towers ~8 pairs/s on 2 cores): few pairs there, many on a GPU
        embed_pairs={"cpu": 64 if quick else 256, "cuda": 4096 if quick else 8192},
        embed_encoders={"cpu": ["towers", VIT], "cuda": ["towers", VIT]},
        embed_batches={"cpu": [32] if quick else [16, 32, 64],
                       "cuda": [128, 256, 512] if quick else [64, 128, 256, 512, 1024]},
        embed_workers={"cpu": min(cores, 2), "cuda": cores},
        # --quick on a CPU: 10k and the default fit sample only (a 100k-pair fit alone takes minutes there)
        fit_sizes=[10_000, 100_000] if quick and cuda else [10_000] if quick else [10_000, 100_000, 1_000_000],
        fit_batch={"cpu": 128, "cuda": 1024},
        # the anchors a default fit can have (<= fit_sample pairs' clean set) and the 100k of the target
        score_anchors=sorted({min(sample or 10_000, 100_000), 100_000}),
        score_kinds=["auto"] if quick else ["flat", "ivf"],
        score_pairs=16_384 if cuda else (2048 if quick else 4096),
        shard_pairs=8192 if cuda else (1024 if quick else 4096),
        shard_counts=[2, 8] if not quick else [2, 4],
        fit_sample=sample,
    )
    plan.fit_sizes = sorted(set(plan.fit_sizes) | {plan.overhead_fit_pairs})
    plan.embed_encoders = {d: plan.embed_encoders[d] for d in devices}
    return plan


def default_fit_sample() -> int:
    """The pipeline's default bicro.fit_sample: what a default run fits on."""
    from bicro_clean.pipeline.config import BiCroConfig

    return BiCroConfig().fit_sample
