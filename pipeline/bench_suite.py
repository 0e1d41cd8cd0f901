"""`bicro-clean bench`: throughput, scaling and memory of every stage in one run, on CPU and (when present) CUDA.

Stages, each in a fresh subprocess so its peak RSS (/proc VmHWM) is its own:
  decode:  shard reader + JPEG decode + the ViT-B-32 transform through the embed stage's DataLoader, N workers;
  embed:   the embed stage end to end (shards -> Parquet) for each encoder, device, batch size and precision;
           one pass with 0 workers gives the share of serial time spent decoding vs in the models;
  fit:     one warm-up epoch and one co-training epoch of BiCro on synthetic 512-d pairs, per pair count;
  score:   BiCroModel.score and score_shard + decide + write from cached embeddings, flat and IVF anchor search,
           per anchor count (and shard count, to check memory is flat in shards).
The overhead ratio (fit + score + write) / embed is computed for 100k pairs from the measured rates: the embed
time of 100k pairs is extrapolated from the measured embed rate and the fit time from one measured epoch of each
kind (warm-up + (epochs - 1) x co-training); the JSON says so under `overhead_ratio.*.how`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BENCH_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
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
                    score_anchors=[200], score_kinds=["flat", "ivf"], score_pairs=128, shard_pairs=64, shard_counts=[1, 2],
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
        embed_batches={"cpu": [32] if quick else [16, 32, 64], "cuda": [128, 256, 512] if quick else [64, 128, 256, 512, 1024]},
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


# --------------------------------------------------------------------------------------------- helpers


def default_fit_sample() -> int:
    from bicro_clean.pipeline.config import BiCroConfig

    return BiCroConfig().fit_sample


def peak_rss_mb() -> float:
    from bicro_clean.pipeline.bench_score import peak_rss_mib

    return round(peak_rss_mib(), 1)


def cuda_peak_mb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def machine_info() -> dict[str, Any]:
    import platform

    import torch

    from bicro_clean.pipeline.bench_score import _cpu_model
    from bicro_clean.pipeline.parquet_io import cpu_threads

    info: dict[str, Any] = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "cpu_threads": cpu_threads(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "load_avg_1m": round(os.getloadavg()[0], 2),
                            "cuda": torch.cuda.is_available()}
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return info


def synthetic_jpegs(root: Path, pairs: int, size: tuple[int, int], seed: int = 0) -> tuple[Path, Path]:
    """Photo-like JPEGs (a smooth random field plus grain, ~Flickr file sizes) and distinct captions.

    Pure noise would make every JPEG several times larger and slower to decode than a photo.
    """
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(root / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for i in range(pairs):
            coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize(size, Image.BICUBIC)
            grain = rng.integers(-12, 13, (size[1], size[0], 3))
            pixels = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / f"{i:07d}.jpg", quality=90)
            words = " ".join(f"w{x}" for x in rng.integers(0, 5000, 10))
            writer.writerow([f"{i:07d}.jpg", f"a photo of {words} number {i}"])
    return images, root / "captions.csv"


def build_shards(root: Path, pairs: int, shards: int, size: tuple[int, int], data_dir: Path | None) -> Path:
    """`shards` img2dataset-style tars of `pairs` samples (Flickr8k JPEGs when data_dir is given)."""
    from bicro_clean.pipeline.bench import _flickr_source
    from bicro_clean.pipeline.make_shards import make_shards

    src = root / "src"
    src.mkdir(parents=True)
    if data_dir is not None:
        images, captions = _flickr_source(src, data_dir, pairs)
    else:
        images, captions = synthetic_jpegs(src, pairs, size)
    out = root / "shards"
    make_shards(images, captions, out, shard_size=max(1, -(-pairs // shards)))
    return out


# ------------------------------------------------------------------------------------------- stages


def stage_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Samples/s of the embed stage's reader + decode + transform, through its DataLoader, per worker count."""
    from bicro_clean.models.encoders import load_encoder
    from bicro_clean.pipeline.config import CleanConfig
    from bicro_clean.pipeline.embed import _loader
    from bicro_clean.pipeline.shards import expand_shard_spec

    encoder = load_encoder(spec["transform"], "cpu")
    runs = []
    for source, shards_dir in spec["sources"].items():
        shards = list(expand_shard_spec(str(Path(shards_dir) / "*.tar")))
        for workers in spec["workers"]:
            config = CleanConfig(input=str(Path(shards_dir) / "*.tar"), output=spec["scratch"],
                                 embed={"encoder": spec["transform"], "batch_size": 64, "num_workers": workers,
                                        "progress": False})
            start, samples = time.perf_counter(), 0
            for chunk in _loader(shards, encoder, config):
                samples += len(chunk.rows)
            seconds = time.perf_counter() - start
            runs.append({"source": source, "workers": min(workers, len(shards)), "samples": samples,
                         "seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 1)})
    return {"runs": runs}


def _warm_up(encoder: Any, batch: int) -> None:
    """One batch through both towers first: CUDA context, cuDNN autotuning and lazy inits are not throughput."""
    import torch
    from PIL import Image

    pixels = encoder.image_transform()(Image.new("RGB", (320, 240)))  # the model's own input shape
    encoder.encode_images(pixels.unsqueeze(0).repeat(batch, 1, 1, 1))
    encoder.encode_texts(["warm up"] * batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def embed_point(encoder_spec: str, device: str, shards_dir: str, scratch: str, batch: int, workers: int,
                autocast: bool, encoder: Any) -> dict[str, Any]:
    """The embed stage end to end on the shards (read, decode, both models, Parquet write)."""
    import shutil

    from bicro_clean.pipeline.config import CleanConfig
    from bicro_clean.pipeline.embed import EmbedTimings, embed_shards

    config = CleanConfig(input=str(Path(shards_dir) / "*.tar"), output=scratch,
                         embed={"encoder": encoder_spec, "batch_size": batch, "num_workers": workers,
                                "device": device, "progress": False, "autocast": autocast})
    timings = EmbedTimings()
    start = time.perf_counter()
    embed_shards(config, encoder=encoder, timings=timings)
    total = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    precision = "bf16-autocast" if autocast and device == "cuda" else "fp32"
    return {"encoder": encoder_spec, "device": device, "precision": precision, "batch_size": batch,
            "workers": workers, "pairs": timings.samples, "seconds": round(total, 2),
            "pairs_per_s": round(timings.samples / total, 1),
            "share_waiting_for_decode": round(timings.wait_s / total, 3),
            "share_image_model": round(timings.image_model_s / total, 3),
            "share_text_model": round(timings.text_model_s / total, 3)}


def stage_embed(spec: dict[str, Any]) -> dict[str, Any]:
    """One encoder on one device: batch sweep with workers, plus a 0-worker pass for the decode share."""
    import torch

    from bicro_clean.models.encoders import load_encoder

    device, runs = spec["device"], []
    precisions = [True, False] if device == "cuda" else [False]
    try:
        encoders = {p: load_encoder(spec["encoder"], device, p) for p in precisions}
    except Exception as error:  # e.g. towers weights not installed on this machine: say so, measure the rest
        return {"runs": [], "skipped": f"{spec['encoder']} on {device}: {type(error).__name__}: {error}"}
    for autocast, encoder in encoders.items():
        _warm_up(encoder, spec["batches"][0])
        for batch in spec["batches"] if autocast or len(precisions) == 1 else spec["batches"][-1:]:
            runs.append(embed_point(spec["encoder"], device, spec["shards"], spec["scratch"], batch,
                                    spec["workers"], autocast, encoder))
    first = encoders[precisions[0]]
    runs.append(embed_point(spec["encoder"], device, spec["shards"], spec["scratch"], spec["batches"][0], 0,
                            precisions[0], first))
    return {"runs": runs, "cuda_peak_mb": cuda_peak_mb() if device == "cuda" else None,
            "torch_threads": torch.get_num_threads()}


def stage_fit(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds of one warm-up epoch and one co-training epoch (division, anchors, labels, training) at n pairs."""
    import torch

    from bicro_clean.models.bicro import BiCroParams, _threads, run_cotraining
    from bicro_clean.models.cotrain import CoTrainer, NegativeBank, PairData, seeded
    from bicro_clean.pipeline.bench_score import synthetic_pairs

    n, device = spec["pairs"], spec["device"]
    image, text = synthetic_pairs(n, seed=3)
    # threads: the default 2 on CPU (the dev machine's cores); every core on a GPU machine (faiss IVF, hashing)
    params = BiCroParams(epochs=2, warmup_epochs=1, batch_size=spec["batch_size"], anchor_index=spec["index"],
                         threads=2 if device == "cpu" else 0)  # every other parameter at its default
    marks: list[float] = []
    start = time.perf_counter()
    with seeded(params.seed, device), _threads(params.threads):
        data = PairData.build(image, text, device)
        bank = NegativeBank.sample(data, params.bank_size, params.seed)
        trainer = CoTrainer(data, params.train_config(), params.seed, True, device)
        prepared = time.perf_counter()

        def mark(*_: Any) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        run_cotraining(trainer, data, bank, params, 0, start, monitor=mark)
    return {"pairs": n, "device": device, "index": spec["index"], "batch_size": spec["batch_size"],
            "prepare_s": round(prepared - start, 2), "warmup_epoch_s": round(marks[0] - prepared, 2),
            "cotrain_epoch_s": round(marks[1] - marks[0], 2), "cuda_peak_mb": cuda_peak_mb()}


def _model_with_anchors(base_dir: str, anchors: int, index: str, out: Path, threads: int) -> int:
    """Save the base model with `anchors` anchors: the consistency-space embeddings of fresh synthetic pairs."""
    import torch

    from bicro_clean.models.bicro import BiCroModel
    from bicro_clean.models.cotrain import embed_pairs
    from bicro_clean.pipeline.bench_score import synthetic_pairs

    model = BiCroModel.load(base_dir)
    image, text = synthetic_pairs(anchors, seed=11)
    with torch.no_grad():
        parts = [embed_pairs(net, torch.from_numpy(image), torch.from_numpy(text)) for net in model.nets]
        a_img, a_txt = model.consistency_embeddings([p[0] for p in parts], [p[1] for p in parts])
    model.anchor_img, model.anchor_txt = a_img.contiguous(), a_txt.contiguous()
    model.anchor_keys = [f"anchor/{i:09d}" for i in range(anchors)]
    model.params.anchor_index = index
    model.params.threads = threads
    model.save(out)
    return anchors


def stage_score_model(spec: dict[str, Any]) -> dict[str, Any]:
    """The base model (one warm-up epoch on synthetic pairs) and one checkpoint per (anchors, index)."""
    from bicro_clean.pipeline.bench_score import fit_model

    root = Path(spec["root"])
    base = root / "base"
    fit_model(spec["train_pairs"], spec["train_pairs"]).save(base)
    made = {}
    for anchors in spec["anchors"]:
        for index in spec["kinds"]:
            path = root / f"bicro-{index}-{anchors}"
            _model_with_anchors(str(base), anchors, index, path, spec["threads"])
            made[f"{index}@{anchors}"] = str(path)
    return {"checkpoints": made}


def stage_score_point(spec: dict[str, Any]) -> dict[str, Any]:
    """BiCroModel.score on in-memory pairs, or the per-shard path (score_shard + decide + write + finalize)."""
    import torch

    from bicro_clean.pipeline.bench_score import measure_path, synthetic_pairs
    from bicro_clean.pipeline.score import load_model

    torch.set_num_threads(2 if spec["device"] == "cpu" else torch.get_num_threads())
    if spec["kind"] == "path":
        result = measure_path(spec["checkpoint"], spec["shards"], spec["shard_pairs"], 0)
    else:
        model = load_model(spec["checkpoint"])
        start = time.perf_counter()
        model.scoring_state()
        build = time.perf_counter() - start
        image, text = synthetic_pairs(spec["pairs"], seed=1)
        keys = [f"bench/{i:09d}" for i in range(spec["pairs"])]
        start, cpu = time.perf_counter(), time.process_time()
        model.score(image, text, keys=keys)
        seconds = time.perf_counter() - start
        result = {"pairs": spec["pairs"], "seconds": seconds, "cpu_s": time.process_time() - cpu,
                  "index_build_s": round(build, 2)}
    result["pairs_per_s"] = round(result["pairs"] / result["seconds"], 1)
    result["cuda_peak_mb"] = cuda_peak_mb()
    return result


STAGES = {"decode": stage_decode, "embed": stage_embed, "fit": stage_fit, "score_model": stage_score_model,
          "score_point": stage_score_point}


def spawn(stage: str, spec: dict[str, Any], isolate: bool = True) -> dict[str, Any]:
    """Run one stage in a fresh interpreter (in this one when not `isolate`); adds its wall seconds and peak RSS."""
    start = time.perf_counter()
    if not isolate:
        result = run_stage(stage, spec)
        result["stage_wall_s"] = round(time.perf_counter() - start, 1)
        return result
    done = subprocess.run([sys.executable, "-m", "bicro_clean.pipeline.bench_suite", "--stage", stage, "--spec",
                           json.dumps(spec)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench stage {stage} {spec} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["stage_wall_s"] = round(time.perf_counter() - start, 1)
    logger.info("bench %s %s: %.0fs", stage, {k: v for k, v in spec.items() if k in
                                               ("encoder", "device", "pairs", "index", "kind", "anchors")},
                result["stage_wall_s"])
    return result


def run_stage(stage: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Body of a stage subprocess."""
    result = STAGES[stage](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
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


# ------------------------------------------------------------------------------------------- summary


def summarise(result: dict[str, Any], plan: Plan) -> None:
    """The headline keys: best rates per setting, fit seconds per epoch, peak RSS per stage, overhead ratios."""
    # the best rate of any batch size and worker count: the overhead ratio is then never flattered by a slow
    # embed setting (on 2 cores, 0 decode workers beat 2: the workers take the model's cores)
    embed_rates: dict[str, float] = {}
    for group in result["embed"]:
        for r in group["runs"]:
            key = f"{r['encoder']}|{r['device']}|{r['precision']}"
            embed_rates[key] = max(embed_rates.get(key, 0.0), r["pairs_per_s"])
    result["embed_pairs_per_s"] = embed_rates
    result["decode_samples_per_s"] = {f"{r['source']}|workers={r['workers']}": r["samples_per_s"]
                                      for r in result["decode"]["runs"]}
    result["fit_seconds_per_epoch"] = {
        f"{f['pairs']}|{f['index']}": {"warmup": f["warmup_epoch_s"], "cotrain": f["cotrain_epoch_s"]}
        for f in result["fit"]}
    # linear in pairs <=> the same microseconds per pair at every size
    result["fit_us_per_pair"] = {
        str(f["pairs"]): {"warmup": round(f["warmup_epoch_s"] / f["pairs"] * 1e6, 1),
                          "cotrain": round(f["cotrain_epoch_s"] / f["pairs"] * 1e6, 1)} for f in result["fit"]}
    result["score_pairs_per_s"] = {
        f"{p['kind']}|{p['index']}|{p['anchors']}" + (f"|{p['shards']}x{p['shard_pairs']}" if p["kind"] == "path"
                                                      else ""): p["pairs_per_s"]
        for p in result["score"]["points"]}
    result["peak_rss_mb"] = {
        "decode": result["decode"]["peak_rss_mb"],
        "embed": max((g.get("peak_rss_mb", 0) for g in result["embed"]), default=0),
        "fit": {f"{f['pairs']}|{f['index']}": f["peak_rss_mb"] for f in result["fit"]},
        "score": {k: p["peak_rss_mb"] for k, p in zip(result["score_pairs_per_s"], result["score"]["points"])},
    }
    result["overhead_ratio_detail"] = overhead(result, plan, embed_rates)
    primary = _primary(result["overhead_ratio_detail"], plan)
    result["overhead_ratio"] = result["overhead_ratio_detail"][primary]["ratio"] if primary else None
    result["overhead_ratio_setting"] = primary


def _primary(detail: dict[str, Any], plan: Plan) -> str | None:
    """The headline setting: ViT-B-32 on the GPU when there is one, else towers on the CPU."""
    wanted = [f"{VIT}|cuda|bf16-autocast", "towers|cpu|fp32", "tiny|cpu|fp32"]
    for key in wanted:
        if key in detail:
            return key
    return next(iter(detail), None)


def resolved_search(kind: str, anchors: int, device: str) -> str:
    """The anchor search a bank of `anchors` distinct rows gets under `bicro.anchor_index` = kind."""
    from bicro_clean.models.bicro import use_ivf

    return "ivf" if use_ivf(kind, anchors, "torch" if device == "cuda" else "faiss") else "flat"


def overhead(result: dict[str, Any], plan: Plan, embed_rates: dict[str, float]) -> dict[str, Any]:
    """(fit + score + write) / embed for plan.overhead_pairs input pairs with the default configuration, per
    embed setting, with how each term was got.

    The default fits on `bicro.fit_sample` pairs (all of them when the input is smaller), so the fit term is the
    measured fit at that size; scoring and writing cover every input pair, with the anchors such a fit can have.
    """
    n, epochs = plan.overhead_pairs, 8  # BiCroParams' default recipe: 1 warm-up + 7 co-training epochs
    fit_pairs = plan.overhead_fit_pairs
    fits = {f["pairs"]: f for f in result["fit"]}
    size = min(fits, key=lambda s: abs(s - fit_pairs))
    fit = fits[size]
    fit_s = (fit["warmup_epoch_s"] + (epochs - 1) * fit["cotrain_epoch_s"]) * fit_pairs / size
    # score + write: the per-shard path with the smallest measured bank that holds every anchor of that fit
    paths = [p for p in result["score"]["points"] if p["kind"] == "path"
             and resolved_search(p["index"], p["anchors"], plan.device)
             == resolved_search("auto", p["anchors"], plan.device)]
    enough = [p["anchors"] for p in paths if p["anchors"] >= fit_pairs]
    top = min(enough) if enough else max(p["anchors"] for p in paths)
    path_rate = min(p["pairs_per_s"] for p in paths if p["anchors"] == top)
    score_s = n / path_rate
    search = resolved_search("auto", top, plan.device)
    out = {}
    for key, rate in embed_rates.items():
        embed_s = n / rate
        # terms to the millisecond: the tiny test run's terms are ~2 s, where 0.1 s rounding moved the ratio 2%
        out[key] = {"ratio": round((fit_s + score_s) / embed_s, 4), "embed_s": round(embed_s, 3),
                    "fit_s": round(fit_s, 3), "score_write_s": round(score_s, 3), "index": search,
                    "fit_pairs": fit_pairs,
                    "how": (f"embed: {n:,} pairs at the measured {rate} pairs/s (extrapolated); fit: the default "
                            f"bicro.fit_sample = {plan.fit_sample:,} pairs, measured warm-up + {epochs - 1} x "
                            f"co-training epoch at {size:,} pairs"
                            f"{'' if size == fit_pairs else f', scaled by {fit_pairs / size:g}'}; score+write: "
                            f"{n:,} pairs at the slowest measured per-shard rate with {top:,} anchors "
                            f"({search} search, {path_rate} pairs/s)")}
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    lines = [f"Machine: {m['cpu']}, {m['cpu_cores']} cores{gpu}; Python {m['python']}, torch {m['torch']}, "
             f"faiss {m['faiss']}; 1-min load at start {m['load_avg_1m']}. Total {result['total_s']} s.", "",
             "| stage | setting | figure | peak RSS MiB |", "|---|---|---|---|"]
    for r in result["decode"]["runs"]:
        lines.append(f"| read+decode | {r['source']}, {r['workers']} workers | {r['samples_per_s']:,} samples/s | "
                     f"{result['decode']['peak_rss_mb']:,.0f} |")
    for g in result["embed"]:
        if g.get("skipped"):
            lines.append(f"| embed | {g['encoder']} {g['device']} | skipped: {g['skipped'][:80]} | |")
        for r in g["runs"]:
            share = (f"; {r['share_waiting_for_decode']:.0%} decode, {r['share_image_model']:.0%} image, "
                     f"{r['share_text_model']:.0%} text" if r["workers"] == 0 else "")
            lines.append(f"| embed | {r['encoder']} {r['device']} {r['precision']}, batch {r['batch_size']}, "
                         f"{r['workers']} workers | {r['pairs_per_s']:,} pairs/s{share} | {g['peak_rss_mb']:,.0f} |")
    for f in result["fit"]:
        per_pair = result["fit_us_per_pair"][str(f["pairs"])]["cotrain"]
        gpu_mem = f", GPU peak {f['cuda_peak_mb']:,.0f} MiB" if f.get("cuda_peak_mb") else ""
        lines.append(f"| fit | {f['pairs']:,} pairs, {f['device']}, batch {f['batch_size']}, {f['index']} | "
                     f"warm-up epoch {f['warmup_epoch_s']} s, co-training epoch {f['cotrain_epoch_s']} s "
                     f"({per_pair:,.0f} us per pair){gpu_mem} | "
                     f"{f['peak_rss_mb']:,.0f} |")
    for p in result["score"]["points"]:
        what = ("BiCroModel.score" if p["kind"] == "score" else
                f"score_shard+decide+write {p['shards']} x {p['shard_pairs']}")
        build = f" (index build {p['index_build_s']} s)" if "index_build_s" in p else ""
        search = p["index"] if p["index"] != "auto" else f"auto = {resolved_search('auto', p['anchors'], p['device'])}"
        lines.append(f"| score | {what}, {search}, {p['anchors']:,} anchors, {p['device']} | "
                     f"{p['pairs_per_s']:,} pairs/s{build} | {p['peak_rss_mb']:,.0f} |")
    for key, o in result["overhead_ratio_detail"].items():
        lines.append(f"| overhead ratio | {key}, {o['index']} | {o['ratio']} = ({o['fit_s']:.1f} s fit + "
                     f"{o['score_write_s']:.1f} s score+write) / {o['embed_s']:.1f} s embed | |")
    return "\n".join(lines)


def append_to_doc(result: dict[str, Any], command: str, path: Path = BENCH_DOC) -> None:
    """Append (never rewrite: the file holds earlier runs) this run's table under its command."""
    section = (f"\n## `bicro-clean bench` ({time.strftime('%Y-%m-%d')})\n\nCommand: `{command}`\n\n"
               f"{markdown(result)}\n\nOverhead ratio: {result['overhead_ratio_detail'].get(result['overhead_ratio_setting'], {}).get('how', '')}.\n")
    with open(path, "a") as fh:
        fh.write(section)


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
