"""Benchmarks that print figures (never timed tests): embedding stage throughput and where its time goes."""

from __future__ import annotations

import csv
import json
import logging
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bicro_clean.models.encoders import load_encoder
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.embed import EmbedTimings, embed_shards
from bicro_clean.pipeline.make_shards import make_shards
from bicro_clean.pipeline.parquet_io import cpu_threads

logger = logging.getLogger(__name__)


def machine_info() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": cpu_threads(),
            "platform": platform.platform(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _synthetic_source(root: Path, pairs: int, size: int) -> tuple[Path, Path]:
    """JPEG photos-like noise images plus captions, when no real data is at hand."""
    images = root / "images"
    images.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    with open(root / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for i in range(pairs):
            pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(images / f"{i:07d}.jpg", quality=85)
            writer.writerow([f"{i:07d}.jpg", f"synthetic picture number {i} with some words"])
    return images, root / "captions.csv"


def _flickr_source(root: Path, data_dir: Path, pairs: int) -> tuple[Path, Path]:
    """First `pairs` images of Flickr8k with their first caption (real JPEG decode cost)."""
    with open(data_dir / "captions.csv", newline="", encoding="utf-8") as fh:
        rows = {}
        for row in csv.DictReader(fh):
            rows.setdefault(row["image"], row["caption"])
    chosen = sorted(rows)[:pairs]
    with open(root / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows([name, rows[name]] for name in chosen)
    return data_dir / "images", root / "captions.csv"


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
            images, captions = _flickr_source(root, data_dir, pairs)
            source = f"flickr8k ({pairs} images, 224x224 JPEG)"
        else:
            images, captions = _synthetic_source(root, pairs, 256)
            source = f"synthetic ({pairs} images, 256x256 JPEG)"
        make_shards(images, captions, root / "shards", shard_size=max(1, pairs // 4))
        runs = [bench_embed(spec, root / "shards", root / "out", bs, w)
                for spec in encoders for bs in batch_sizes for w in sorted({0, workers})]
    return {"benchmark": "embed", "source": source, "machine": machine_info(), "runs": runs}


def markdown_table(result: dict[str, Any]) -> str:
    head = "| encoder | device | batch | workers | pairs/s | decode share | image model | text model |\n"
    head += "|---|---|---|---|---|---|---|---|\n"
    rows = [f"| {r['encoder']} | {r['device']} | {r['batch_size']} | {r['workers']} | {r['pairs_per_s']} | "
            f"{r['share_waiting_for_decode']:.0%} | {r['share_image_model']:.0%} | {r['share_text_model']:.0%} |"
            for r in result["runs"]]
    return head + "\n".join(rows)


def emit(result: dict[str, Any], table: str, out: Path | None) -> None:
    """What every benchmark script ends with: the figures as JSON and a Markdown table on stdout, JSON to --out."""
    print(json.dumps(result, indent=2))
    print(table)
    if out:
        out.write_text(json.dumps(result, indent=2))


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
