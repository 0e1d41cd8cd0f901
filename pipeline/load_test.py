"""Load test: a synthetic run of N pairs (tiny encoder, 64-pixel JPEGs) through reader -> embed -> fit -> score ->
write, each size in its own process so its peak RSS can be measured.

    python -m pipeline.load_test --pairs 50000,200000

prints one line per size (pairs, shards, wall seconds per stage, pairs/s, peak RSS of the run's process and of
its decode workers) and writes them as JSON with `--json FILE`. `tests/test_load.py` runs the same measurement.

Shards hold `--shard-pairs` pairs each (5,000 by default; img2dataset writes 10,000), so a bigger run means more
shards, not bigger ones: memory must stay flat in the number of shards. BiCro is fitted on a fixed sample of
pairs (`bicro.fit_sample`), which is how a large run is meant to be configured; the fit therefore costs the
same at every size and the rest scales linearly.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SHARD_PAIRS = 5_000
IMAGE_SIZE = 64
POOL = 512  # distinct pictures; every pair's JPEG bytes are still unique (see _unique_jpeg)
NOISE_RATE = 0.2
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("square", "circle", "stripe", "cross", "dot", "wave", "grid", "ring")
# A small BiCro, fitted on a fixed sample: the load test measures the data path, not the model's quality.
# One torch thread everywhere: on 2 cores shared with a decode worker (and other jobs), 2 OpenMP threads made the
# tiny encoder 10x slower (measured: 256 images 0.56 s with 2 threads, 0.04 s with 1).
BICRO = {"embed_dim": 32, "hidden_dim": 64, "epochs": 2, "warmup_epochs": 1, "batch_size": 256,
         "fit_sample": 8192, "anchor_top_k": 2048, "top_anchors": 256, "threads": 1}
EMBED = {"encoder": "tiny", "num_workers": 1, "batch_size": 256, "progress": False, "threads": 1}


# ---------------------------------------------------------------- synthetic shards


def _picture_pool(seed: int) -> list[tuple[bytes, str]]:
    """POOL small JPEGs (a colour field with a pattern and noise) and the caption stem that describes each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for i in range(POOL):
        colour, shape = i % len(COLOURS), (i // len(COLOURS)) % len(SHAPES)
        base = np.array([(colour * 37) % 256, (colour * 91) % 256, (colour * 53) % 256], dtype=np.float32)
        pixels = base + rng.normal(0, 25, (IMAGE_SIZE, IMAGE_SIZE, 3))
        pixels[:: shape + 2, :, :] = 255 - base  # the "shape": stripes at a shape-specific period
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
        pool.append((buffer.getvalue(), f"a {COLOURS[colour]} picture with a {SHAPES[shape]} pattern"))
    return pool


def _unique_jpeg(jpeg: bytes, pair: int) -> bytes:
    """The pool JPEG with a COM segment naming the pair: a valid JPEG whose bytes (and sha256) are unique, so
    the embed stage encodes every pair's image, as it would for a real crawl, without encoding 200k JPEGs here."""
    comment = f"pair {pair}".encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(directory: Path, pairs: int, shard_pairs: int = SHARD_PAIRS, seed: int = 0) -> list[Path]:
    """img2dataset-style shards (KEY.jpg, KEY.txt, KEY.json) of `pairs` pairs, NOISE_RATE of captions mismatched."""
    pool = _picture_pool(seed)
    rng = np.random.default_rng(seed + 1)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(-(-pairs // shard_pairs)):
        path = directory / f"{shard:05d}.tar"
        first = shard * shard_pairs
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for pair in range(first, min(first + shard_pairs, pairs)):
                picture = int(rng.integers(POOL))
                noisy = rng.random() < NOISE_RATE
                stem = pool[(picture + int(rng.integers(1, POOL))) % POOL if noisy else picture][1]
                key = f"{shard:05d}{pair - first:05d}"
                _add(tar, f"{key}.jpg", _unique_jpeg(pool[picture][0], pair))
                _add(tar, f"{key}.txt", f"{stem}, number {pair}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "truth_clean": not noisy}).encode())
        paths.append(path)
    return paths


# ---------------------------------------------------------------- one measured run (child process)


def _peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def run_once(shards: list[Path], output: Path) -> dict[str, Any]:
    """The whole data path on `shards` in this process: embed, then fit + score + write + finalize (no report)."""
    from bicro_clean.pipeline.config import CleanConfig
    from bicro_clean.pipeline.embed import embed_shards
    from bicro_clean.pipeline.run import run_pipeline

    config = CleanConfig.model_validate({
        "input": [str(p) for p in shards], "output": str(output), "bicro": BICRO, "embed": EMBED})
    start = time.perf_counter()
    embed_shards(config)
    embedded = time.perf_counter()
    summary = run_pipeline(config, report=False)  # embeddings are cached now: fit, score, write, finalize
    done = time.perf_counter()
    pairs = summary["in"]
    return {"pairs": pairs, "shards": len(shards), "kept": summary["kept"], "dropped": summary["dropped"],
            "errors": summary["errors"], "embed_s": round(embedded - start, 1),
            "fit_score_write_s": round(done - embedded, 1), "wall_s": round(done - start, 1),
            "pairs_per_s": round(pairs / (done - start), 1), "peak_rss_mib": round(_peak_mib(resource.RUSAGE_SELF)),
            "worker_peak_rss_mib": round(_peak_mib(resource.RUSAGE_CHILDREN))}


# ---------------------------------------------------------------- driver


def measure(sizes: list[int], work: Path, shard_pairs: int = SHARD_PAIRS) -> list[dict[str, Any]]:
    """Write shards for the largest size once; run each size (its first shards) in a fresh process."""
    shards = write_shards(work / "shards", max(sizes), shard_pairs)
    results = []
    for pairs in sorted(sizes):
        output = work / f"out-{pairs}"
        count = -(-pairs // shard_pairs)
        command = [sys.executable, "-m", "bicro_clean.pipeline.load_test", "--child", str(output),
                   *[str(p) for p in shards[:count]]]
        result, lifetime_peak = _run_child(command)
        results.append({**result, "process_peak_rss_mib": lifetime_peak})
        shutil.rmtree(output)  # 200k pairs of outputs are ~1 GB; nothing after this reads them
        logger.info("%s", results[-1])
    return results


def _run_child(command: list[str]) -> tuple[dict[str, Any], int]:
    """The child's JSON result and its whole-lifetime peak RSS in MiB (startup and exit included), taken from
    os.wait4's rusage for exactly that process rather than what it says about itself before exiting."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command, output)
    return json.loads(output.strip().splitlines()[-1]), round(usage.ru_maxrss / 1024)


def _format(result: dict[str, Any]) -> str:
    return (f"{result['pairs']:>7} pairs {result['shards']:>3} shards  wall {result['wall_s']:>6.1f} s "
            f"(embed {result['embed_s']:.1f} s, fit+score+write {result['fit_score_write_s']:.1f} s)  "
            f"{result['pairs_per_s']:>6.1f} pairs/s  peak RSS {result['peak_rss_mib']} MiB during the run, "
            f"{result['process_peak_rss_mib']} MiB over the process's life (decode worker "
            f"{result['worker_peak_rss_mib']} MiB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="50000,200000", help="comma-separated run sizes")
    parser.add_argument("--shard-pairs", type=int, default=SHARD_PAIRS)
    parser.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", nargs="+", metavar=("OUTPUT", "SHARD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one measured run; its JSON is the last stdout line
        print(json.dumps(run_once([Path(p) for p in args.child[1:]], Path(args.child[0]))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sizes = [int(n) for n in args.pairs.split(",")]
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        results = measure(sizes, Path(work), args.shard_pairs)
    for result in results:
        print(_format(result))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
