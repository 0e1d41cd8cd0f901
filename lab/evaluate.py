"""Real-data evaluation: Flickr8k with synthetic noisy correspondence, frozen `towers` embeddings.

Training pairs: the 30,455 train-split captions, each with its image, with floor(R*N) pairs made noisy per noise
kind (pipeline.noise_kinds.noise_plan, seed S): `shuffle` gives the caption another image (the NCR/BiCro protocol,
pipeline.noise.caption_noise exactly), `near-miss` replaces the caption by a textually close caption of another
train photo (its cached embedding), `alt-text` by generated boilerplate (embedded with the same text encoder,
cached per set of strings). Every method trains two matchers with the same recipe, epochs and seeds and is
evaluated in its FINAL state (nothing is chosen on the test split or the ground truth):

- vanilla: hardest-negative triplet on all pairs, no division (models.baselines.fit_plain);
- cosine:  the vanilla matchers' cosine on each training pair as the clean score (the towers' counterpart of a
           CLIP score); vanilla is trained once when both are asked;
- ncr:     NCR (Huang et al., NeurIPS 2021): GMM co-division on per-pair loss, co-rectified soft labels
           (models.baselines.fit_ncr);
- bicro:   models.train.fit_bicro (scores soft_label, p_clean and, when the model has it, clean_score);
- oracle:  the vanilla recipe on the truly clean pairs only.

This module owns the benchmark (loading with injected noise, detection and retrieval metrics, the table); the
methods live in models/.

Detection is over the training pairs, clean = positive class: AUROC of every score a method has, overall and per
noise kind (clean pairs vs the pairs of that kind). keep = soft_label >= 0.5 (the select rule before clean_score);
est_noise_rate = 1 - mean(keep). Retrieval: 1,000 test images x 5 captions, similarity = mean of the two
networks' cosines; i2t counts an image query correct when any of its 5 captions is in the top K.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from bicro_clean.lab.flickr8k import cached_embeddings, cached_text_embeddings, load_flickr8k
from bicro_clean.lab.metrics import auroc
from bicro_clean.models.baselines import fit_ncr, fit_plain
from bicro_clean.models.cotrain import embed_rows, torch_threads
from bicro_clean.models.matcher import Matcher
from bicro_clean.models.params import BiCroParams
from bicro_clean.models.train import fit_bicro
from bicro_clean.pipeline.noise_kinds import NOISY_KINDS, check_rates, noise_plan

logger = logging.getLogger(__name__)

METHODS = ("bicro", "ncr", "vanilla", "cosine", "oracle")
SCORES = ("soft_label", "p_clean", "clean_score", "cosine")  # every detection score a method may give
PRIMARY = ("clean_score", "cosine", "p_clean", "soft_label")  # the first one a method has: its per-kind column


@dataclass
class Benchmark:
    """One noisy-correspondence instance: training pairs after noise, their truth, and the clean test split."""

    train_image: np.ndarray  # (N, Di) image embedding of each training pair (after noise)
    train_text: np.ndarray  # (N, Dt)
    clean: np.ndarray  # (N,) bool ground truth, only for metrics
    test_image: np.ndarray  # (1000, Di)
    test_text: np.ndarray  # (5000, Dt)
    test_caption_image: np.ndarray  # (5000,) index into test_image
    kind: np.ndarray | None = None  # (N,) noise kind of each pair (clean, shuffle, ...); None: shuffle only

    def kinds(self) -> np.ndarray:
        return np.where(self.clean, "clean", "shuffle") if self.kind is None else self.kind


def noise_rates(noise: float | Mapping[str, float]) -> dict[str, float]:
    """A plain rate is shuffle noise (the literature's protocol); a mapping gives a rate per kind."""
    return check_rates({"shuffle": float(noise)} if isinstance(noise, (int, float)) else noise)


def noise_kind_name(rates: Mapping[str, float]) -> str:
    return next(iter(rates)) if len(rates) == 1 else "mix"


def load_benchmark(data_dir: str | Path, noise: float | Mapping[str, float], seed: int,
                   cache_dir: str | Path) -> Benchmark:
    data = load_flickr8k(data_dir)
    emb = cached_embeddings(data_dir, cache_dir, "towers")
    split = np.array([data.split_of_image[name] for name in data.image_names])
    cap_split = split[data.caption_image]
    train_caps = np.flatnonzero(cap_split == "train")
    plan = noise_plan(data.caption_image[train_caps], [data.captions[i] for i in train_caps], noise_rates(noise),
                      seed)
    # near-miss donors are train captions (plan.caption indexes train_caps); alt-text slots (-1) are filled below
    train_text = emb["text_emb"][train_caps[np.maximum(plan.caption, 0)]]
    alt = np.flatnonzero(plan.caption < 0)
    if len(alt):
        train_text[alt] = cached_text_embeddings([plan.text[i] for i in alt], cache_dir, "towers")
    test_images = np.flatnonzero(split == "test")
    test_caps = np.flatnonzero(cap_split == "test")
    position = {img: i for i, img in enumerate(test_images)}
    return Benchmark(
        train_image=emb["image_emb"][plan.image],
        train_text=train_text,
        clean=plan.clean,
        test_image=emb["image_emb"][test_images],
        test_text=emb["text_emb"][test_caps],
        test_caption_image=np.array([position[i] for i in data.caption_image[test_caps]], dtype=np.int64),
        kind=plan.kind,
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


def detection(clean: np.ndarray, scores: Mapping[str, np.ndarray | None]) -> dict:
    """AUROC of every score given (None = the method has no such score), and the keep rule's figures from
    soft_label."""
    out: dict = {f"auroc_{name}": None for name in SCORES} | {"auprc_soft_label": None}
    out |= {k: None for k in ("precision", "recall", "f1", "est_noise_rate")}
    for name, score in scores.items():
        if score is not None:
            out[f"auroc_{name}"] = auroc(score, clean)
    soft_label = scores.get("soft_label")
    if soft_label is not None:
        out["auprc_soft_label"] = float(average_precision_score(clean, soft_label))
        keep = soft_label >= 0.5
        tp = float(np.sum(keep & clean))
        precision = tp / max(float(keep.sum()), 1.0)
        recall = tp / max(float(clean.sum()), 1.0)
        out["precision"], out["recall"] = precision, recall
        out["f1"] = 2 * precision * recall / max(precision + recall, 1e-12)
        out["est_noise_rate"] = float(1.0 - keep.mean())
    return out


def detection_by_kind(kind: np.ndarray, scores: Mapping[str, np.ndarray | None]) -> dict[str, dict[str, float]]:
    """Per noise kind present: AUROC of each score over the clean pairs and the pairs of that kind only."""
    clean = kind == "clean"
    out: dict[str, dict[str, float]] = {}
    for name in NOISY_KINDS:
        rows = clean | (kind == name)
        if np.any(kind == name) and any(v is not None for v in scores.values()):
            out[name] = {f"auroc_{s}": auroc(v[rows], clean[rows]) for s, v in scores.items() if v is not None}
    return out


@torch.no_grad()
def pair_cosine(nets: list[Matcher], image: np.ndarray, text: np.ndarray, device: str) -> np.ndarray:
    """(N,) mean over the networks of the cosine of each pair: the matcher's counterpart of a CLIP score."""
    images, texts = torch.from_numpy(image).to(device), torch.from_numpy(text).to(device)
    total = np.zeros(len(image))
    for net in nets:
        net.eval()
        cosine = (embed_rows(net.embed_images, images) * embed_rows(net.embed_texts, texts)).sum(1)
        total += cosine.double().cpu().numpy()
    return (total / len(nets)).astype(np.float32)


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


def _fit(method: str, bench: Benchmark, params: BiCroParams, device: str,
         shared: dict[str, list[Matcher]]) -> tuple[list[Matcher], dict[str, np.ndarray], dict]:
    """Train one method: its two matchers, its detection scores per training pair, extra figures."""
    if method == "bicro":
        model, outputs = fit_bicro(bench.train_image, bench.train_text, params, device=device)
        scores = {name: outputs[name] for name in ("soft_label", "p_clean", "clean_score") if name in outputs}
        mixture = float(np.mean([m.noisy_weight() for m in model.mixtures]))
        return model.nets, scores, {"est_noise_rate_mixture": mixture}
    if method == "ncr":
        nets, outputs = fit_ncr(bench.train_image, bench.train_text, params, device)
        scores = {"soft_label": outputs["soft_label"], "p_clean": outputs["p_clean"]}
        return nets, scores, {"est_noise_rate_mixture": float(outputs["noisy_weight"].mean())}
    if method == "oracle":
        return fit_plain(bench.train_image, bench.train_text, params, device, np.flatnonzero(bench.clean)), {}, {}
    # vanilla and cosine share one training: the second of them reuses the nets (its seconds exclude the fit)
    extra = {"reuses": "vanilla"} if "vanilla" in shared else {}
    if "vanilla" not in shared:
        shared["vanilla"] = fit_plain(bench.train_image, bench.train_text, params, device)
    nets = shared["vanilla"]
    if method == "cosine":
        with torch_threads(params.threads):
            return nets, {"cosine": pair_cosine(nets, bench.train_image, bench.train_text, device)}, extra
    return nets, {}, extra


def evaluate(
    data_dir: str | Path,
    noise: float | Mapping[str, float],
    seed: int,
    methods: Sequence[str] = METHODS,
    out_path: str | Path | None = None,
    cache_dir: str | Path = ".cache/bicro-clean",
    params: BiCroParams | None = None,
    device: str = "cpu",
) -> dict:
    """`noise`: a shuffle rate, or a rate per kind (pipeline.noise_kinds.resolve_rates builds it from flags)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    params = (params or BiCroParams()).model_copy(update={"seed": seed})
    rates = noise_rates(noise)
    bench = load_benchmark(data_dir, rates, seed, cache_dir)
    return run_methods(bench, rates, seed, methods, out_path, params, device)


def run_methods(bench: Benchmark, rates: Mapping[str, float], seed: int, methods: Sequence[str],
                out_path: str | Path | None, params: BiCroParams, device: str) -> dict:
    """Every method on one benchmark instance; the results as `evaluate` returns and writes them."""
    kinds = bench.kinds()
    counts = {name: int(np.sum(kinds == name)) for name in ("clean", *NOISY_KINDS)}
    logger.info("benchmark: %d training pairs, %s", len(bench.clean), counts)
    results: dict = {"noise_rate": round(sum(rates.values()), 9), "noise_kind": noise_kind_name(rates),
                     "noise_rates": dict(rates), "noise_counts": counts, "seed": seed, "methods": {}}
    shared: dict[str, list[Matcher]] = {}
    for method in methods:
        t0, cpu0 = time.time(), time.process_time()
        nets, scores, extra = _fit(method, bench, params, device, shared)
        with torch_threads(params.threads):
            sims = test_similarity(nets, bench, device)
        entry = detection(bench.clean, scores) | retrieval(sims, bench.test_caption_image) | extra
        entry["score"] = next((name for name in PRIMARY if name in scores), None)
        entry["by_kind"] = detection_by_kind(kinds, scores)
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


def _kinds_present(results: Sequence[dict]) -> list[str]:
    found = {kind for res in results for e in res["methods"].values() for kind in e.get("by_kind", {})}
    return [kind for kind in NOISY_KINDS if kind in found]


def _noise_label(res: dict) -> str:
    return f"{res.get('noise_kind', 'shuffle')} {res['noise_rate']:.3g}"  # results before noise kinds: shuffle


def _kind_cells(entry: dict, kinds: list[str]) -> list[str]:
    """The method's primary score (PRIMARY) per kind: clean pairs vs that kind's pairs."""
    score = entry.get("score")
    by_kind = entry.get("by_kind", {})
    values = [by_kind.get(kind, {}).get(f"auroc_{score}") if score else None for kind in kinds]
    return [score or "", *(_fmt(v, 3) for v in values)]


def results_table(results: Sequence[dict]) -> str:
    """Markdown table of several `evaluate` results (e.g. one per noise level or kind), in the order given.
    Columns: AUROC of each score a method gives; per noise kind present, the AUROC of the method's primary score
    (bicro: clean_score, else p_clean; ncr: p_clean; cosine: cosine); then the keep rule and retrieval."""
    kinds = _kinds_present(results)
    entries = [e for res in results for e in res["methods"].values()]
    scores = [s for s in SCORES if s != "cosine" or any(e.get("auroc_cosine") is not None for e in entries)]
    header = ["noise", "method", *(f"AUROC {s}" for s in scores)]
    if kinds:
        header += ["per-kind score", *(f"AUROC {kind}" for kind in kinds)]
    header += ["est. noise", "precision / recall", "i2t R@1/5/10", "t2i R@1/5/10", "rSum", "vs oracle",
               "seconds (cpu s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for res in results:
        methods = res["methods"]
        for name, e in methods.items():
            pr = "" if e.get("precision") is None else f"{e['precision']:.3f} / {e['recall']:.3f}"
            cells = [_noise_label(res), name, *(_fmt(e.get(f"auroc_{s}"), 3) for s in scores)]
            cells += _kind_cells(e, kinds) if kinds else []
            cells += [_fmt(e.get("est_noise_rate"), 3), pr, " / ".join(f"{x:.1f}" for x in e["i2t"]),
                      " / ".join(f"{x:.1f}" for x in e["t2i"]), f"{e['rsum']:.1f}", _ratio_to_oracle(e, methods),
                      f"{e['seconds']:.0f} ({e.get('cpu_seconds', 0):.0f})"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
