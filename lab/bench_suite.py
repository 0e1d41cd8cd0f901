"""`bicro-clean bench`: throughput, scaling and memory of every stage in one run, on CPU and (when present) CUDA.

Stages, each in a fresh subprocess so its peak RSS (/proc VmHWM) is its own:
  decode:  shard reader + JPEG decode + the ViT-B-32 transform through the embed stage's DataLoader, N workers;
  embed:   the embed stage end to end (shards -> Parquet) for each encoder, device, batch size and precision;
           one pass with 0 workers gives the share of serial time spent decoding vs in the models;
  fit:     one warm-up epoch and one co-training epoch of BiCro on synthetic 512-d pairs, per pair count;
  score:   BiCroModel.score and score_shard + decide + write from cached embeddings, flat and IVF anchor search,
           per anchor count (and shard count, to check memory is flat in shards).
The plan (sizes) is `bench_plan`, the stage bodies `bench_stages`, the headline keys and table `bench_summary`;
this module builds the inputs, runs each stage and assembles the result.
The overhead ratio (fit + score + write) / embed is computed for 100k pairs from the measured rates: the embed
time of 100k pairs is extrapolated from the measured embed rate and the fit time from one measured epoch of each
kind (warm-up + (epochs - 1) x co-training); the JSON says so under `overhead_ratio.*.how`.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bicro_clean.lab.bench_plan import Plan
from bicro_clean.lab.bench_stages import run_stage
from bicro_clean.lab.bench_summary import summarise
from bicro_clean.lab.flickr8k import flickr_shards
from bicro_clean.lab.machine import machine_info
from bicro_clean.lab.synthetic import ShardSpec, write_shards

logger = logging.getLogger(__name__)


def build_shards(root: Path, pairs: int, shards: int, size: tuple[int, int], data_dir: Path | None) -> Path:
    """`shards` img2dataset-style tars of `pairs` samples: Flickr8k JPEGs when data_dir is given, else synthetic
    photo-like JPEGs of `size` with distinct captions."""
    if data_dir is not None:
        return flickr_shards(root, data_dir, pairs, shards)
    write_shards(root / "shards", ShardSpec(pairs, max(1, -(-pairs // shards)), image_size=size))
    return root / "shards"


def spawn(stage: str, spec: dict[str, Any], isolate: bool = True) -> dict[str, Any]:
    """Run one stage in a fresh interpreter (in this one when not `isolate`); adds its wall seconds and peak RSS."""
    start = time.perf_counter()
    if not isolate:
        result = run_stage(stage, spec)
        result["stage_wall_s"] = round(time.perf_counter() - start, 1)
        return result
    done = subprocess.run([sys.executable, "-m", "bicro_clean.lab.bench_suite", "--stage", stage, "--spec",
                           json.dumps(spec)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench stage {stage} {spec} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["stage_wall_s"] = round(time.perf_counter() - start, 1)
    logger.info("bench %s %s: %.0fs", stage, {k: v for k, v in spec.items() if k in
                                               ("encoder", "device", "pairs", "index", "kind", "anchors")},
                result["stage_wall_s"])
    return result


# ------------------------------------------------------------------------------------------- the run


def run_suite(plan: Plan, data_dir: Path | None = None, partial: Path | None = None) -> dict[str, Any]:
    """Every stage in turn; with `partial`, the figures so far are written there after each stage."""
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "suite", "machine": machine_info(), "plan": asdict(plan)}

    def keep() -> None:
        if partial is not None:
            partial.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory(prefix="bicro-bench-") as tmp:
        root = Path(tmp)
        result["decode"], shards = _decode(plan, root, data_dir)
        keep()
        result["embed"] = _embed(plan, root, shards["synthetic"])
        keep()
        result["fit"] = _fit(plan)
        keep()
        result["score"] = _score(plan, root)
    result["total_s"] = round(time.perf_counter() - started, 1)
    summarise(result, plan)
    return result


def _decode(plan: Plan, root: Path, data_dir: Path | None) -> tuple[dict[str, Any], dict[str, str]]:
    shards_n = max(max(plan.decode_workers), 1) * 2  # every worker gets shards (the loader splits by shard)
    sources = {"synthetic": str(build_shards(root / "synthetic", plan.decode_pairs, shards_n, plan.image_size,
                                             None))}
    if data_dir is not None and (data_dir / "captions.csv").exists():
        sources["flickr8k"] = str(build_shards(root / "flickr8k", plan.decode_pairs, shards_n, plan.image_size,
                                               data_dir))
    spec = {"sources": sources, "workers": plan.decode_workers, "transform": plan.decode_transform,
            "scratch": str(root / "scratch")}
    return spawn("decode", spec, plan.isolate), sources


def _embed(plan: Plan, root: Path, decode_shards: str) -> list[dict[str, Any]]:
    out = []
    for device, encoders in plan.embed_encoders.items():
        pairs = plan.embed_pairs[device]
        shards_n = max(plan.embed_workers[device], 1) * 2
        shards = decode_shards  # the decode stage's shards when the sizes match: JPEG synthesis is slow
        if pairs != plan.decode_pairs or shards_n > max(max(plan.decode_workers), 1) * 2:
            shards = str(build_shards(root / f"embed-{device}", pairs, shards_n, plan.image_size, None))
        for encoder in encoders:
            spec = {"encoder": encoder, "device": device, "shards": shards, "batches": plan.embed_batches[device],
                    "workers": plan.embed_workers[device], "scratch": str(root / "embed-out")}
            out.append({"encoder": encoder, "device": device, **spawn("embed", spec, plan.isolate)})
    return out


def _fit(plan: Plan) -> list[dict[str, Any]]:
    """The default recipe (anchor bank capped at anchor_top_k, "auto" anchor search) at every size."""
    out = []
    for n in plan.fit_sizes:
        spec = {"pairs": n, "device": plan.device, "index": "auto", "batch_size": plan.fit_batch[plan.device]}
        out.append(spawn("fit", spec, plan.isolate))
    return out


def _score(plan: Plan, root: Path) -> dict[str, Any]:
    made = spawn("score_model", {"root": str(root / "ckpt"), "anchors": plan.score_anchors, "kinds": plan.score_kinds,
                                 "threads": 2 if plan.device == "cpu" else 0,
                                 "train_pairs": min(8192, max(plan.score_anchors) * 2)}, plan.isolate)
    points = []
    for name, checkpoint in made["checkpoints"].items():
        index, anchors = name.split("@")
        common = {"checkpoint": checkpoint, "device": plan.device, "index": index, "anchors": int(anchors)}
        points.append({**common, **spawn("score_point", {**common, "kind": "score", "pairs": plan.score_pairs},
                                         plan.isolate)})
        for shards in plan.shard_counts:
            spec = {**common, "kind": "path", "shards": shards, "shard_pairs": plan.shard_pairs}
            points.append({**common, "kind": "path", "shards": shards, "shard_pairs": plan.shard_pairs,
                           **spawn("score_point", spec, plan.isolate)})
    for p in points:
        p.setdefault("kind", "score")
        p.pop("checkpoint", None)
    return {"model": {k: v for k, v in made.items() if k != "checkpoints"}, "points": points}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Every stage's throughput and memory")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    if args.stage:  # internal: one stage, in its own process
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_stage(args.stage, json.loads(args.spec))))
        return
    raise SystemExit("use `bicro-clean bench`")


if __name__ == "__main__":
    main()
