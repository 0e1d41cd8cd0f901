"""Real-data evaluation: Flickr8k with synthetic noisy correspondence, frozen `towers` embeddings.

Training pairs: the 30,455 train-split captions, each with its image, with floor(R*N) captions given another
image (pipeline.noise.caption_noise, seed S). Every method trains two matchers with the same recipe, epochs
and seeds and is evaluated in its FINAL state (nothing is chosen on the test split or the ground truth):

- vanilla: hardest-negative triplet on all pairs, no division (models.baselines.fit_plain);
- ncr:     NCR (Huang et al., NeurIPS 2021): GMM co-division on per-pair loss, co-rectified soft labels
           (models.baselines.fit_ncr);
- bicro:   models.train.fit_bicro;
- oracle:  the vanilla recipe on the truly clean pairs only.

This module owns the benchmark (loading with injected noise, detection and retrieval metrics, the table); the
methods live in models/.

Detection is over the training pairs, clean = positive class. keep = soft_label >= 0.5 (the select stage's
default rule); est_noise_rate = 1 - mean(keep). Retrieval: 1,000 test images x 5 captions, similarity = mean of
the two networks' cosines; i2t counts an image query correct when any of its 5 captions is in the top K.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from bicro_clean.lab.flickr8k import cached_embeddings, load_flickr8k
from bicro_clean.lab.metrics import auroc
from bicro_clean.models.baselines import fit_ncr, fit_plain
from bicro_clean.models.cotrain import embed_rows, torch_threads
from bicro_clean.models.matcher import Matcher
from bicro_clean.models.params import BiCroParams
from bicro_clean.models.train import fit_bicro
from bicro_clean.pipeline.noise import caption_noise

logger = logging.getLogger(__name__)

METHODS = ("bicro", "ncr", "vanilla", "oracle")


@dataclass
class Benchmark:
    """One noisy-correspondence instance: training pairs after noise, their truth, and the clean test split."""

    train_image: np.ndarray  # (N, Di) image embedding of each training pair (after noise)
    train_text: np.ndarray  # (N, Dt)
    clean: np.ndarray  # (N,) bool ground truth, only for metrics
    test_image: np.ndarray  # (1000, Di)
    test_text: np.ndarray  # (5000, Dt)
    test_caption_image: np.ndarray  # (5000,) index into test_image


def load_benchmark(data_dir: str | Path, noise_rate: float, seed: int, cache_dir: str | Path) -> Benchmark:
    data = load_flickr8k(data_dir)
    emb = cached_embeddings(data_dir, cache_dir, "towers")
    split = np.array([data.split_of_image[name] for name in data.image_names])
    cap_split = split[data.caption_image]
    train_caps = np.flatnonzero(cap_split == "train")
    true_image = data.caption_image[train_caps]
    assigned = caption_noise(true_image, noise_rate, seed)
    test_images = np.flatnonzero(split == "test")
    test_caps = np.flatnonzero(cap_split == "test")
    position = {img: i for i, img in enumerate(test_images)}
    return Benchmark(
        train_image=emb["image_emb"][assigned],
        train_text=emb["text_emb"][train_caps],
        clean=assigned == true_image,
        test_image=emb["image_emb"][test_images],
        test_text=emb["text_emb"][test_caps],
        test_caption_image=np.array([position[i] for i in data.caption_image[test_caps]], dtype=np.int64),
    )


# ----------------------------------------------------------------------------------------- metrics


def retrieval(sims: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, list[float]]:
    """sims: (images, captions). Recall@K in percent for both directions."""
    n_img = sims.shape[0]
    order = np.argsort(-sims, axis=1, kind="stable")  # captions ranked per image
    is_own = caption_image[order] == np.arange(n_img)[:, None]
    first_hit = is_own.argmax(axis=1)
    i2t = [float(100.0 * np.mean(first_hit < k)) for k in ks]
    order_t = np.argsort(-sims.T, axis=1, kind="stable")  # images ranked per caption
    rank_t = (order_t == caption_image[:, None]).argmax(axis=1)
    t2i = [float(100.0 * np.mean(rank_t < k)) for k in ks]
    return {"i2t": i2t, "t2i": t2i, "rsum": float(sum(i2t) + sum(t2i))}


def detection(clean: np.ndarray, soft_label: np.ndarray | None, p_clean: np.ndarray | None) -> dict:
    out: dict = {k: None for k in ("auroc_soft_label", "auprc_soft_label", "auroc_p_clean")}
    out |= {k: None for k in ("precision", "recall", "f1", "est_noise_rate")}
    if soft_label is not None:
        out["auroc_soft_label"] = auroc(soft_label, clean)
        out["auprc_soft_label"] = float(average_precision_score(clean, soft_label))
        keep = soft_label >= 0.5
        tp = float(np.sum(keep & clean))
        precision = tp / max(float(keep.sum()), 1.0)
        recall = tp / max(float(clean.sum()), 1.0)
        out["precision"], out["recall"] = precision, recall
        out["f1"] = 2 * precision * recall / max(precision + recall, 1e-12)
        out["est_noise_rate"] = float(1.0 - keep.mean())
    if p_clean is not None:
        out["auroc_p_clean"] = auroc(p_clean, clean)
    return out


@torch.no_grad()
def test_similarity(nets: list[Matcher], bench: Benchmark, device: str) -> np.ndarray:
    """(images, captions) similarity = mean of the networks' cosines."""
    images = torch.from_numpy(bench.test_image).to(device)
    texts = torch.from_numpy(bench.test_text).to(device)
    sims = np.zeros((len(images), len(texts)))
    for net in nets:
        net.eval()
        sims += (embed_rows(net.embed_images, images) @ embed_rows(net.embed_texts, texts).T).double().cpu().numpy()
    return sims / len(nets)


# --------------------------------------------------------------------------------------- evaluate


def evaluate(
    data_dir: str | Path,
    noise_rate: float,
    seed: int,
    methods: Sequence[str] = METHODS,
    out_path: str | Path | None = None,
    cache_dir: str | Path = ".cache/bicro-clean",
    params: BiCroParams | None = None,
    device: str = "cpu",
) -> dict:
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    params = (params or BiCroParams()).model_copy(update={"seed": seed})
    bench = load_benchmark(data_dir, noise_rate, seed, cache_dir)
    logger.info("benchmark: %d training pairs, realised noise %.4f", len(bench.clean), 1 - bench.clean.mean())
    results: dict = {"noise_rate": noise_rate, "seed": seed, "methods": {}}
    for method in methods:
        t0, cpu0 = time.time(), time.process_time()
        soft = p_clean = None
        extra: dict = {}
        if method == "bicro":
            model, outputs = fit_bicro(bench.train_image, bench.train_text, params, device=device)
            nets, soft, p_clean = model.nets, outputs["soft_label"], outputs["p_clean"]
            extra["est_noise_rate_mixture"] = float(np.mean([m.noisy_weight() for m in model.mixtures]))
        elif method == "ncr":
            nets, outputs = fit_ncr(bench.train_image, bench.train_text, params, device)
            soft, p_clean = outputs["soft_label"], outputs["p_clean"]
            extra["est_noise_rate_mixture"] = float(outputs["noisy_weight"].mean())
        else:
            rows = np.flatnonzero(bench.clean) if method == "oracle" else None
            nets = fit_plain(bench.train_image, bench.train_text, params, device, rows)
        with torch_threads(params.threads):
            sims = test_similarity(nets, bench, device)
        entry = detection(bench.clean, soft, p_clean) | retrieval(sims, bench.test_caption_image) | extra
        entry["seconds"] = round(time.time() - t0, 1)
        entry["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # the machine may be shared: wall time varies
        results["methods"][method] = entry
        logger.info("%s: %s", method, json.dumps(entry))
    if out_path is not None:
        Path(out_path).write_text(json.dumps(results, indent=2))
    return results


# ------------------------------------------------------------------------------------------ report


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _ratio_to_oracle(entry: dict, methods: dict) -> str:
    oracle = methods.get("oracle")
    if oracle is None or not oracle.get("rsum"):
        return ""
    return f"{entry['rsum'] / oracle['rsum']:.2f}x"


def results_table(results: Sequence[dict]) -> str:
    """Markdown table of several `evaluate` results (one per noise level), in the order given."""
    lines = [
        "| noise | method | AUROC soft_label | AUROC p_clean | est. noise | precision / recall | "
        "i2t R@1/5/10 | t2i R@1/5/10 | rSum | vs oracle | seconds (cpu s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        methods = res["methods"]
        for name, e in methods.items():
            pr = "" if e.get("precision") is None else f"{e['precision']:.3f} / {e['recall']:.3f}"
            lines.append(
                f"| {res['noise_rate']} | {name} | {_fmt(e.get('auroc_soft_label'), 3)} | "
                f"{_fmt(e.get('auroc_p_clean'), 3)} | {_fmt(e.get('est_noise_rate'), 3)} | {pr} | "
                f"{' / '.join(f'{x:.1f}' for x in e['i2t'])} | {' / '.join(f'{x:.1f}' for x in e['t2i'])} | "
                f"{e['rsum']:.1f} | {_ratio_to_oracle(e, methods)} | "
                f"{e['seconds']:.0f} ({e.get('cpu_seconds', 0):.0f}) |"
            )
    return "\n".join(lines)
