"""Scoring throughput from cached embeddings: pairs/s and peak RSS, for `BiCroModel.score` and the per-shard path.

    python -m bicro_clean.lab.bench_score [--pairs N] [--anchors K[,K...]] [--shard-pairs M] [--shards 2,8]
                                          [--anchor-index flat,auto] [--embeddings DIR] [--checkpoint CKPT]
                                          [--profile] [--no-append]

`--embeddings <out>/embeddings` fits on and scores real pairs (e.g. towers 1280/384-d, where the "pca" search
applies; synthetic banks are isotropic and stay exact); `--checkpoint` scores with a saved checkpoint, no fit.

One BiCro model is fitted quickly (one warm-up epoch, default 512/1024 sizes) on synthetic 512-d pairs; its
anchor bank is then cut to each K (the K most confident anchors: what `anchor_top_k=K` keeps). Every point runs
in a fresh subprocess so its peak RSS (/proc VmHWM) is its own:
  score: `BiCroModel.score` on N pairs held in memory (the model alone);
  path:  embeddings Parquet + matching tar shards -> duplicate_keys, score_shard, score_shard_stage (decide,
         annotated/filtered Parquet, cleaned tars), finalize; run with 2 and 8 shards of M pairs so memory
         can be checked flat in the number of shards.
Prints a JSON and a Markdown table and appends the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bicro_clean.lab.machine import machine_info, peak_rss_mib
from bicro_clean.lab.output import BENCH_DOC, append_section, emit
from bicro_clean.lab.synthetic import (
    NOISE_RATE,
    ShardSpec,
    SyntheticShard,
    synthetic_pairs,
    write_embeddings,
    write_shards,
)

logger = logging.getLogger(__name__)

THREADS = 2  # the project's default bicro.threads; also this machine's core count
TARGET_PAIRS_PER_S = 50_000
IMAGE_SIZE = (16, 16)  # every sample shows the same small JPEG: the path is measured, not decoding


# ------------------------------------------------------------------------------------------------ inputs


def real_pairs(folder: str, n: int = 0) -> tuple[Any, Any]:
    """The ok (image, text) rows of an embeddings folder (`<out>/embeddings/*.parquet`, e.g. towers 1280/384-d),
    in file then row order, as float32; the first `n` (0 = all). Stands in for synthetic_pairs with --embeddings."""
    from bicro_clean.pipeline.fit import load_fit_pairs

    paths = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    image, text, _ = load_fit_pairs(paths, 0, 0)
    return (image[:n], text[:n]) if n else (image, text)


def bench_pairs(n: int, seed: int, embeddings: str | None) -> tuple[Any, Any]:
    """`n` pairs: synthetic (seeded) or, with an embeddings folder, real rows cycled from its start."""
    if not embeddings:
        return synthetic_pairs(n, seed)
    import numpy as np

    image, text = real_pairs(embeddings)
    rows = np.arange(n) % len(image)
    return image[rows], text[rows]


CALIBRATION_PAIRS = 2048  # enough for clean_score's five weights; its cost is not what these benchmarks measure


def fit_model(pool_pairs: int, train_pairs: int, seed: int = 0, embeddings: str | None = None) -> Any:
    """A BiCro model: one warm-up epoch on `train_pairs`, then the final division over `pool_pairs`.

    Anchors come from the final division, so dividing a larger pool than was trained on gives a 100k-anchor
    bank without training on 125k pairs (~10 min on 2 cores). `fit_bicro` is not called because it ends by
    scoring every training pair against the whole anchor bank: at 100k anchors, the very cost measured here; its
    clean_score calibration is fitted on the first CALIBRATION_PAIRS pairs instead.
    """
    from bicro_clean.models.cotrain import CoTrainer, NegativeBank, PairData, seeded, torch_threads
    from bicro_clean.models.params import BiCroParams
    from bicro_clean.models.train import calibrate_clean_score, finalise, run_cotraining

    image, text = real_pairs(embeddings, pool_pairs) if embeddings else synthetic_pairs(pool_pairs, seed)
    pool_pairs = len(image)
    train = min(train_pairs, pool_pairs)
    params = BiCroParams(seed=seed, epochs=1, warmup_epochs=1, threads=THREADS)
    keys = [f"fit/{i:09d}" for i in range(pool_pairs)]
    with seeded(seed, "cpu"), torch_threads(THREADS):
        data = PairData.build(image[:train], text[:train], "cpu")
        bank = NegativeBank.sample(data, params.bank_size, seed)
        trainer = CoTrainer(data, params.train_config(), seed, True, "cpu")
        run_cotraining(trainer, data, bank, params, 0, time.time())
        pool = data if train == pool_pairs else PairData.build(image, text, "cpu")
        model = finalise(trainer, pool, bank, params, keys, True, "cpu")
        n = min(CALIBRATION_PAIRS, pool_pairs)
        calibrate_clean_score(model, image[:n], text[:n], keys[:n])  # no train: calibrated in-sample
    return model


def save_with_anchors(model: Any, anchors: int, path: Path) -> int:
    """Save `model` with only its `anchors` most confident anchors (the bank is sorted by confidence)."""
    full = (model.anchor_img, model.anchor_txt, model.anchor_keys)
    kept = min(anchors, len(full[2]))
    model.anchor_img, model.anchor_txt = full[0][:kept].contiguous(), full[1][:kept].contiguous()
    model.anchor_keys = full[2][:kept]
    model.params.anchor_top_k = kept
    try:
        model.save(path)
    finally:
        model.anchor_img, model.anchor_txt, model.anchor_keys = full
    return kept


def load_checkpoint(path: str) -> Any:
    from bicro_clean.models.bicro import BiCroModel

    return BiCroModel.load(path)


def make_dataset(root: Path, shards: int, shard_pairs: int, seed: int) -> tuple[str, str]:
    """`shards` tar shards + their cached embeddings under root; returns (input glob, output dir)."""
    output = str(root / "out")

    def cache_embeddings(shard: SyntheticShard) -> None:
        image, text = synthetic_pairs(len(shard.keys), seed + 1000 + shard.index)
        write_embeddings(output, str(shard.path), shard.keys, shard.captions, image, text, IMAGE_SIZE)

    spec = ShardSpec(shards * shard_pairs, shard_pairs, image_size=IMAGE_SIZE, pictures=1, seed=seed)
    write_shards(root / "in", spec, on_shard=cache_embeddings)
    return str(root / "in" / "*.tar"), output


# ------------------------------------------------------------------------------------ one measured point


def measure_score(checkpoint: str, pairs: int, seed: int, index: str | None = None,
                  embeddings: str | None = None) -> dict[str, Any]:
    """`BiCroModel.score` alone on `pairs` in-memory pairs with run-wide keys (as score_batch passes them);
    `index` overrides the checkpoint's `anchor_index` (flat = exact search, auto = the default)."""
    from bicro_clean.pipeline.score import load_model

    model = load_model(checkpoint)
    if index:
        model.params.anchor_index = index
    model.scoring_state()  # built once per loaded model; paid on the first score() otherwise
    image, text = bench_pairs(pairs, seed + 1, embeddings)
    keys = [f"bench/{i:09d}" for i in range(pairs)]
    rss_before = peak_rss_mib()
    start, cpu = time.perf_counter(), time.process_time()
    model.score(image, text, keys=keys)
    seconds = time.perf_counter() - start
    search = model.scoring_state().indexes[0].kind if model.scoring_state().indexes else "-"
    return {"pairs": pairs, "seconds": seconds, "search": search, "cpu_s": time.process_time() - cpu,
            "rss_before_mib": rss_before}


def measure_path(checkpoint: str, shards: int, shard_pairs: int, seed: int) -> dict[str, Any]:
    """Run-wide values + per shard (score_shard, then write_stage: decide and write) + finalize."""
    from bicro_clean.pipeline.config import CleanConfig
    from bicro_clean.pipeline.finalize import finalize_stage
    from bicro_clean.pipeline.layout import embedding_path
    from bicro_clean.pipeline.pack import pack_stage
    from bicro_clean.pipeline.run import InProcess, input_shards
    from bicro_clean.pipeline.score import load_model, score_shard
    from bicro_clean.pipeline.select import RunWide, duplicate_keys
    from bicro_clean.pipeline.shards import shard_id
    from bicro_clean.pipeline.write import write_stage

    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        pattern, output = make_dataset(Path(tmp), shards, shard_pairs, seed)
        config = CleanConfig.model_validate({"input": pattern, "output": output})
        urls = input_shards(config)
        model = load_model(checkpoint)
        model.scoring_state()  # anchor index + bank embeddings: once per run, timed apart (index_build_s)
        rss_before = peak_rss_mib()
        start, cpu = time.perf_counter(), time.process_time()
        run_wide = RunWide(None, duplicate_keys([embedding_path(output, u) for u in urls]))
        for url in urls:  # scores first (cached on disk), so the stage below times decide + write alone
            score_shard(url, output, checkpoint, model)
        scored, scored_cpu = time.perf_counter(), time.process_time()
        results = [write_stage(u, config, run_wide) for u in urls]
        pack_stage(InProcess(), config, urls, run_wide)  # shards/NNNNN.tar numbered over the run, then annotated/
        finalize_stage(config, [shard_id(u) for u in urls], checkpoint)
        end, end_cpu = time.perf_counter(), time.process_time()
    kept = sum(r["counts"]["kept"] for r in results)
    # decide + write is one thread: its CPU seconds give pairs/s per core even when shared cores stretch wall time
    return {"pairs": shards * shard_pairs, "seconds": end - start, "score_s": scored - start,
            "decide_write_s": end - scored, "decide_write_cpu_s": end_cpu - scored_cpu, "cpu_s": end_cpu - cpu,
            "kept": kept, "rss_before_mib": rss_before}


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of a point subprocess: measure, optionally profile, add pairs/s and peak RSS."""
    import torch

    torch.set_num_threads(THREADS)
    profiler = cProfile.Profile() if spec.get("profile") else None
    if profiler:
        profiler.enable()
    if spec["kind"] == "score":
        result = measure_score(spec["checkpoint"], spec["pairs"], spec["seed"], spec.get("index"),
                               spec.get("embeddings"))
    else:
        result = measure_path(spec["checkpoint"], spec["shards"], spec["shard_pairs"], spec["seed"])
    if profiler:
        profiler.disable()
        result["profile"] = profile_text(profiler)
    # 1-min load average as the point ends: the cores are shared, and a load above THREADS means slower figures
    result.update(pairs_per_s=result["pairs"] / result["seconds"], peak_rss_mib=peak_rss_mib(),
                  load_avg_1m=round(os.getloadavg()[0], 1))
    return result


def profile_text(profiler: cProfile.Profile, lines: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def spawn_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one point in a fresh interpreter, so peak RSS covers that point only."""
    done = subprocess.run([sys.executable, "-m", "bicro_clean.lab.bench_score", "--point", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark point {spec} failed:\n{done.stderr[-3000:]}")
    return {**{k: v for k, v in spec.items() if k not in ("checkpoint", "profile")},
            **json.loads(done.stdout.strip().splitlines()[-1])}


# ---------------------------------------------------------------------------------------------- the run


def run_benchmark(pairs: int, anchors: list[int], shard_pairs: int, shard_counts: list[int],
                  fit_pairs: int, train_pairs: int, profile: bool, seed: int = 0,
                  indexes: tuple[str, ...] = ("",), embeddings: str | None = None,
                  checkpoint: str | None = None) -> dict[str, Any]:
    if embeddings and shard_counts:
        logger.warning("--embeddings: no path points (they write synthetic 512-d shards)")
        shard_counts = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        start = time.perf_counter()
        model = load_checkpoint(checkpoint) if checkpoint else fit_model(fit_pairs, train_pairs, seed, embeddings)
        fit_s = time.perf_counter() - start
        checkpoints = {}
        for k in anchors if not checkpoint else []:
            path = Path(tmp) / f"bicro-{k}"
            kept = save_with_anchors(model, k, path)
            if kept < k:
                logger.warning("only %d anchors available for the %d-anchor point (raise --fit-pairs)", kept, k)
            checkpoints[kept] = str(path)
        if checkpoint:  # its own anchor bank, uncut
            checkpoints[len(model.anchor_keys)] = checkpoint
        available = len(model.anchor_keys)
        del model
        points = []
        for k, path in checkpoints.items():
            for index in indexes:  # score points per anchor search, one after the other (A/B on one load)
                points.append(spawn_point({"kind": "score", "anchors": k, "pairs": pairs, "seed": seed,
                                           "checkpoint": path, "index": index, "embeddings": embeddings}))
            for n in shard_counts:
                points.append(spawn_point({"kind": "path", "anchors": k, "shards": n, "shard_pairs": shard_pairs,
                                           "seed": seed, "checkpoint": path}))
        if profile:  # the slowest setting, profiled apart so the timings above carry no profiler overhead
            k = max(checkpoints)
            points.append(spawn_point({"kind": "score", "anchors": k, "pairs": min(pairs, 8192), "seed": seed,
                                       "checkpoint": checkpoints[k], "profile": True, "embeddings": embeddings}))
    machine = machine_info()
    fit = {"pairs": fit_pairs, "trained_on": min(train_pairs, fit_pairs), "seconds": round(fit_s, 1),
           "anchors_available": available}
    return {"benchmark": "score", "machine": machine, "fit": fit, "target_pairs_per_s": TARGET_PAIRS_PER_S,
            "points": points}


def markdown_table(result: dict[str, Any]) -> str:
    # CPU s next to wall s shows contention: uncontended, wall ~ CPU / THREADS and the load stays <= THREADS
    head = ("| what | anchors | shards x pairs | pairs/s | wall s | CPU s | score / decide+write wall s "
            "| peak RSS MiB | RSS before work MiB | load |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for p in result["points"]:
        if "profile" in p:
            continue
        what = f"BiCroModel.score ({p.get('search', '-')})" if p["kind"] == "score" else "score_shard + decide + write"
        layout = f"{p['shards']} x {p['shard_pairs']}" if p["kind"] == "path" else f"1 x {p['pairs']}"
        split = f"{p['score_s']:.1f} / {p['decide_write_s']:.1f}" if p["kind"] == "path" else "-"
        rows.append(f"| {what} | {p['anchors']} | {layout} | {p['pairs_per_s']:,.0f} | {p['seconds']:.1f} | "
                    f"{p['cpu_s']:.1f} | {split} | {p['peak_rss_mib']:,.0f} | {p['rss_before_mib']:,.0f} | "
                    f"{p['load_avg_1m']} |")
    return head + "\n".join(rows)


def append_to_doc(result: dict[str, Any], command: str, path: Path = BENCH_DOC) -> None:
    """Append (never rewrite: other benchmarks share the file) this run's table with command and machine."""
    m = result["machine"]
    section = (f"\n## Scoring throughput from cached embeddings ({time.strftime('%Y-%m-%d')})\n\n"
               f"Command: `{command}`\n\n"
               f"Machine: {m['cpu']}, {m['cpu_threads']} CPU threads, Python {m['python']}, torch {m['torch']}, "
               f"faiss {m['faiss']}; the cores are shared with other developers (the load column is the 1-min load "
               f"average as each point ended). BiCro on 512-d embeddings, "
               f"embed_dim 512, hidden_dim 1024, bicro.threads {THREADS}; one warm-up epoch on "
               f"{result['fit']['trained_on']:,} synthetic pairs, anchors from the final division of "
               f"{result['fit']['pairs']:,} ({result['fit']['seconds']} s). "
               f"Each row ran in a fresh process (peak RSS is that row's own). Target: "
               f"{TARGET_PAIRS_PER_S:,} pairs/s with <= 100k anchors.\n\n{markdown_table(result)}\n")
    append_section(section, path)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Scoring-stage throughput and memory benchmark")
    parser.add_argument("--pairs", type=int, default=16_384, help="pairs for the BiCroModel.score points")
    parser.add_argument("--anchors", type=_ints, default=[10_000, 100_000], help="anchor counts, comma separated")
    parser.add_argument("--shard-pairs", type=int, default=4096, help="pairs per shard for the path points")
    parser.add_argument("--shards", type=_ints, default=[2, 8], help="shard counts for the path points")
    parser.add_argument("--fit-pairs", type=int, default=0, help="pairs divided for anchors (0: enough for them)")
    parser.add_argument("--train-pairs", type=int, default=8192, help="pairs the warm-up epoch trains on")
    parser.add_argument("--anchor-index", default="", help="score points per anchor search, comma separated "
                        "(e.g. flat,auto: exact vs the default; empty: the checkpoint's own)")
    parser.add_argument("--embeddings", default="", help="an embeddings folder (<out>/embeddings) to fit and "
                        "score real pairs from instead of synthetic 512-d ones (score points only)")
    parser.add_argument("--checkpoint", default="", help="score points with this checkpoint (no fit)")
    parser.add_argument("--profile", action="store_true", help="add a cProfile'd score point at the most anchors")
    parser.add_argument("--no-append", action="store_true", help=f"do not append to {BENCH_DOC.name}")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: one measured point, in a subprocess
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # ~(1 - NOISE_RATE) of the fit pairs end in the clean set, which is where anchors come from.
    fit_pairs = args.fit_pairs or int(max(args.anchors) / (1 - NOISE_RATE) * 1.15)
    result = run_benchmark(args.pairs, args.anchors, args.shard_pairs, args.shards, fit_pairs, args.train_pairs,
                           args.profile, indexes=tuple(args.anchor_index.split(",")),
                           embeddings=args.embeddings or None, checkpoint=args.checkpoint or None)
    emit(result, markdown_table(result), None)
    if not args.no_append:
        append_to_doc(result, "python -m bicro_clean.lab.bench_score "
                      + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
