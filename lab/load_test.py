"""Load test: a synthetic run of N pairs (tiny encoder, 64-pixel JPEGs) through reader -> embed -> fit -> score ->
write, each size in its own process so its peak RSS can be measured.

    python -m bicro_clean.lab.load_test --pairs 50000,200000

prints one line per size (pairs, shards, wall seconds per stage, pairs/s, peak RSS of the run's process and of
its decode workers) and writes them as JSON with `--json FILE`. `tests/lab/test_load.py` runs the same measurement.
Every peak is a VmHWM (lab.machine): the run's process reads its own and its decode workers', and reports them.

Shards hold `--shard-pairs` pairs each (5,000 by default; img2dataset writes 10,000), so a bigger run means more
shards, not bigger ones: memory must stay flat in the number of shards. BiCro is fitted on a fixed sample of
pairs (`bicro.fit_sample`), which is how a large run is meant to be configured; the fit therefore costs the
same at every size and the rest scales linearly.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bicro_clean.lab.machine import ChildPeaks, peak_rss_mib
from bicro_clean.lab.synthetic import ShardSpec, write_shards

logger = logging.getLogger(__name__)

SHARD_PAIRS = 5_000
IMAGE_SIZE = (64, 64)
POOL = 512  # distinct pictures; every pair's JPEG bytes are still distinct (ShardSpec.distinct_bytes)
NOISE_RATE = 0.2
# A small BiCro, fitted on a fixed sample: the load test measures the data path, not the model's quality.
# One torch thread everywhere: on 2 cores shared with a decode worker (and other jobs), 2 OpenMP threads made the
# tiny encoder 10x slower (measured: 256 images 0.56 s with 2 threads, 0.04 s with 1).
BICRO = {"embed_dim": 32, "hidden_dim": 64, "epochs": 2, "warmup_epochs": 1, "batch_size": 256,
         "fit_sample": 8192, "anchor_top_k": 2048, "top_anchors": 256, "threads": 1}
EMBED = {"encoder": "tiny", "num_workers": 1, "batch_size": 256, "progress": False, "threads": 1}


def shard_spec(pairs: int, shard_pairs: int = SHARD_PAIRS, seed: int = 0) -> ShardSpec:
    """The load test's shards: img2dataset-style (KEY.jpg, KEY.txt, KEY.json with the truth), 64-pixel JPEGs
    from a pool, every pair's bytes distinct (the embed stage encodes every pair, as for a real crawl),
    NOISE_RATE of captions mismatched."""
    return ShardSpec(pairs, shard_pairs, image_size=IMAGE_SIZE, pictures=POOL, distinct_bytes=True,
                     noise_rate=NOISE_RATE, truth=True, quality=85, seed=seed)


# ---------------------------------------------------------------- one measured run (child process)


def run_once(shards: list[Path], output: Path) -> dict[str, Any]:
    """The whole data path on `shards` in this process: embed, then fit + score + write + finalize (no report)."""
    from bicro_clean.pipeline.config import CleanConfig
    from bicro_clean.pipeline.embed import embed_shards
    from bicro_clean.pipeline.run import run_pipeline

    config = CleanConfig.model_validate({
        "input": [str(p) for p in shards], "output": str(output), "bicro": BICRO, "embed": EMBED})
    with ChildPeaks() as workers:  # the decode workers' VmHWM, read while they live
        start = time.perf_counter()
        embed_shards(config)
        embedded = time.perf_counter()
        summary = run_pipeline(config, report=False)  # embeddings are cached now: fit, score, write, finalize
        done = time.perf_counter()
    pairs = summary["in"]
    return {"pairs": pairs, "shards": len(shards), "kept": summary["kept"], "dropped": summary["dropped"],
            "errors": summary["errors"], "embed_s": round(embedded - start, 1),
            "fit_score_write_s": round(done - embedded, 1), "wall_s": round(done - start, 1),
            "pairs_per_s": round(pairs / (done - start), 1), "peak_rss_mib": round(peak_rss_mib()),
            "worker_peak_rss_mib": round(workers.peak_mib)}


# ---------------------------------------------------------------- driver


def measure(sizes: list[int], work: Path, shard_pairs: int = SHARD_PAIRS) -> list[dict[str, Any]]:
    """Write shards for the largest size once; run each size (its first shards) in a fresh process."""
    shards = write_shards(work / "shards", shard_spec(max(sizes), shard_pairs))
    results = []
    for pairs in sorted(sizes):
        output = work / f"out-{pairs}"
        count = -(-pairs // shard_pairs)
        command = [sys.executable, "-m", "bicro_clean.lab.load_test", "--child", str(output),
                   *[str(p) for p in shards[:count]]]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        shutil.rmtree(output)  # 200k pairs of outputs are ~1 GB; nothing after this reads them
        logger.info("%s", results[-1])
    return results


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
        result = run_once([Path(p) for p in args.child[1:]], Path(args.child[0]))
        # the whole process so far (interpreter start, imports, the run, its result): the last moment it can tell
        result["process_peak_rss_mib"] = round(peak_rss_mib())
        print(json.dumps(result))
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
