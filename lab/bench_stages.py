"""The bench suite's stages: what each measures, run in a fresh interpreter by `bench_suite.spawn` (or in-process
for the test's tiny run), taking a JSON spec and returning JSON figures with the process's own peak RSS.

  decode:      shard reader + JPEG decode + transform through the embed stage's DataLoader, per worker count;
  embed:       the embed stage end to end for one encoder on one device, per batch size and precision;
  fit:         one warm-up and one co-training epoch of BiCro on synthetic 512-d pairs;
  score_model: the checkpoints the score points load (a base model, one copy per anchor count and search);
  score_point: BiCroModel.score on in-memory pairs, or score_shard + decide + write from cached embeddings.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from bicro_clean.lab.machine import peak_rss_mib
from bicro_clean.lab.synthetic import synthetic_pairs

logger = logging.getLogger(__name__)


def cuda_peak_mb() -> float | None:
    """Peak CUDA memory torch allocated in this process (None without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


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

    from bicro_clean.models.cotrain import CoTrainer, NegativeBank, PairData, seeded, torch_threads
    from bicro_clean.models.params import BiCroParams
    from bicro_clean.models.train import run_cotraining

    n, device = spec["pairs"], spec["device"]
    image, text = synthetic_pairs(n, seed=3)
    # threads: the default 2 on CPU (the dev machine's cores); every core on a GPU machine (faiss IVF, hashing)
    params = BiCroParams(epochs=2, warmup_epochs=1, batch_size=spec["batch_size"], anchor_index=spec["index"],
                         threads=2 if device == "cpu" else 0)  # every other parameter at its default
    marks: list[float] = []
    start = time.perf_counter()
    with seeded(params.seed, device), torch_threads(params.threads):
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
    from bicro_clean.lab.bench_score import fit_model

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

    from bicro_clean.lab.bench_score import measure_path
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


STAGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "decode": stage_decode, "embed": stage_embed, "fit": stage_fit, "score_model": stage_score_model,
    "score_point": stage_score_point}


def run_stage(stage: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Body of a stage subprocess: the stage's figures plus this process's own peak RSS and the load."""
    result = STAGES[stage](spec)
    result["peak_rss_mb"] = round(peak_rss_mib(), 1)
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return result
