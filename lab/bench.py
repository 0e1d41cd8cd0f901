"""The embed-only benchmark (`bicro-clean bench --embed-only`): embedding stage throughput and where its time goes.

    python -m bicro_clean.lab.bench [--pairs 512] [--data ../shared/data/flickr8k] [--encoder SPEC]...
                                    [--batch-size N]... [--out embed.json]

Benchmarks print figures; they are never timed tests.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bicro_clean.lab.flickr8k import flickr_shards
from bicro_clean.lab.machine import machine_info
from bicro_clean.lab.output import emit
from bicro_clean.lab.synthetic import ShardSpec, write_shards
from bicro_clean.models.encoders import load_encoder
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.embed import EmbedTimings, embed_shards

logger = logging.getLogger(__name__)

SHARDS = 4
SYNTHETIC_SIZE = (256, 256)


def bench_embed(encoder_spec: str, shards_dir: Path, out: Path, batch_size: int, workers: int,
                device: str = "auto") -> dict[str, Any]:
    """One embedding pass; returns pairs/s and the share of time in decode, image model, text model."""
    config = CleanConfig(input=str(shards_dir / "*.tar"), output=str(out),
                         embed={"encoder": encoder_spec, "batch_size": batch_size, "num_workers": workers,
                                "device": device, "progress": False})
    encoder = load_encoder(encoder_spec, device)
    timings = EmbedTimings()
    start = time.perf_counter()
    embed_shards(config, encoder=encoder, timings=timings)
    total = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"encoder": encoder_spec, "device": str(encoder.device), "batch_size": batch_size, "workers": workers,
            "pairs": timings.samples, "seconds": round(total, 2),
            "pairs_per_s": round(timings.samples / total, 1),
            "share_waiting_for_decode": round(timings.wait_s / total, 3),
            "share_image_model": round(timings.image_model_s / total, 3),
            "share_text_model": round(timings.text_model_s / total, 3)}


def run_embed_benchmark(pairs: int = 512, data_dir: Path | None = None, encoders: list[str] | None = None,
                        batch_sizes: tuple[int, ...] = (64,), workers: int = 2) -> dict[str, Any]:
    """Embedding throughput on real Flickr8k JPEGs when available, synthetic JPEGs otherwise.

    Two passes per setting: with 0 workers the main process decodes, so `share_waiting_for_decode` is the
    share of the serial time spent decoding; with workers, decode overlaps the model and the figure that
    matters is end-to-end pairs/s.
    """
    encoders = encoders or (["towers", "open_clip:ViT-B-32"] if torch.cuda.is_available() else ["towers"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if data_dir and (data_dir / "captions.csv").exists():
            shards = flickr_shards(root / "flickr8k", data_dir, pairs, SHARDS)
            source = f"flickr8k ({pairs} images, 224x224 JPEG)"
        else:
            shards = root / "shards"
            write_shards(shards, ShardSpec(pairs, max(1, -(-pairs // SHARDS)), image_size=SYNTHETIC_SIZE))
            source = f"synthetic ({pairs} images, {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]} JPEG)"
        runs = [bench_embed(spec, shards, root / "out", bs, w)
                for spec in encoders for bs in batch_sizes for w in sorted({0, workers})]
    return {"benchmark": "embed", "source": source, "machine": machine_info(), "runs": runs}


def markdown_table(result: dict[str, Any]) -> str:
    head = "| encoder | device | batch | workers | pairs/s | decode share | image model | text model |\n"
    head += "|---|---|---|---|---|---|---|---|\n"
    rows = [f"| {r['encoder']} | {r['device']} | {r['batch_size']} | {r['workers']} | {r['pairs_per_s']} | "
            f"{r['share_waiting_for_decode']:.0%} | {r['share_image_model']:.0%} | {r['share_text_model']:.0%} |"
            for r in result["runs"]]
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Embedding-stage benchmark")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    parser.add_argument("--encoder", action="append")
    parser.add_argument("--batch-size", type=int, action="append")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = run_embed_benchmark(args.pairs, args.data, args.encoder, tuple(args.batch_size or [64]))
    emit(result, markdown_table(result), args.out)


if __name__ == "__main__":
    main()
