"""What the IVF anchor index costs in quality: flat vs IVF scores of the same pairs with the same model.

    python -m bicro_clean.lab.bench_ivf [--data ../shared/data/flickr8k] [--cache /work/cache] [--noise 0.2]
                                        [--epochs 2] [--nprobe 4,8,16,32] [--nlist 0] [--out ivf.json]
    python -m bicro_clean.lab.bench_ivf --recall [--bank 30000] [--nlist 346,512] [--nprobe 4,8,16] [--cache ...]

A BiCro model is fitted on the Flickr8k train split (cached towers embeddings, caption noise as in
`bicro_clean.lab.evaluate`), then every training pair is scored once with the exact anchor search and once per
nprobe with faiss IVF. Agreement: same nearest anchor (i2t / t2i), |delta| of consistency and soft_label, same keep
decision (soft_label >= 0.5), AUROC of soft_label against the injected truth.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from bicro_clean.lab.metrics import auroc
from bicro_clean.lab.output import emit

logger = logging.getLogger(__name__)

KEEP_THRESHOLD = 0.5  # the select stage's default rule


def agreement(flat: dict[str, np.ndarray], approx: dict[str, np.ndarray]) -> dict[str, float]:
    """How far approximate-search scores are from exact-search scores of the same pairs."""
    d_cons = np.abs(flat["consistency"].astype(np.float64) - approx["consistency"])
    d_soft = np.abs(flat["soft_label"].astype(np.float64) - approx["soft_label"])
    keep_f, keep_a = flat["soft_label"] >= KEEP_THRESHOLD, approx["soft_label"] >= KEEP_THRESHOLD
    return {
        "same_anchor_i2t": float(np.mean(flat["anchor_for_image"] == approx["anchor_for_image"])),
        "same_anchor_t2i": float(np.mean(flat["anchor_for_text"] == approx["anchor_for_text"])),
        "consistency_mean_abs_diff": float(d_cons.mean()),
        "consistency_p99_abs_diff": float(np.quantile(d_cons, 0.99)),
        "soft_label_mean_abs_diff": float(d_soft.mean()),
        "same_keep_decision": float(np.mean(keep_f == keep_a)),
    }


def with_index(model: Any, kind: str, nlist: int = 0, nprobe: int = 16) -> Any:
    """A shallow copy of `model` scoring with another anchor index (weights and banks shared, state rebuilt)."""
    other = copy.copy(model)
    other.params = model.params.model_copy(update={"anchor_index": kind, "ivf_nlist": nlist, "ivf_nprobe": nprobe})
    other._state = None
    return other


def timed_score(model: Any, image: np.ndarray, text: np.ndarray, keys: list[str]) -> tuple[dict, float, float]:
    """(outputs, index build seconds, scoring seconds)."""
    start = time.perf_counter()
    model.scoring_state()
    built = time.perf_counter()
    out = model.score(image, text, keys)
    return out, built - start, time.perf_counter() - built


def run(data_dir: Path, cache_dir: Path, noise: float, epochs: int, nprobes: list[int], nlist: int,
        seed: int = 0) -> dict[str, Any]:
    from bicro_clean.lab.evaluate import load_benchmark
    from bicro_clean.models.params import BiCroParams
    from bicro_clean.models.train import fit_bicro

    bench = load_benchmark(data_dir, noise, seed, cache_dir)
    keys = [f"train/{i}" for i in range(len(bench.train_image))]
    params = BiCroParams(seed=seed, epochs=epochs, warmup_epochs=1)
    start = time.perf_counter()
    model, _ = fit_bicro(bench.train_image, bench.train_text, params, keys=keys)
    fit_s = time.perf_counter() - start
    flat, flat_build, flat_s = timed_score(with_index(model, "flat"), bench.train_image, bench.train_text, keys)
    rows = [{"index": "flat", "build_s": flat_build, "score_s": flat_s,
             "auroc_soft_label": auroc(flat["soft_label"], bench.clean)}]
    for nprobe in nprobes:
        ivf_model = with_index(model, "ivf", nlist, nprobe)
        out, build_s, score_s = timed_score(ivf_model, bench.train_image, bench.train_text, keys)
        index = ivf_model.scoring_state().indexes[0].index
        rows.append({"index": "ivf", "nlist": int(index.nlist), "nprobe": nprobe, "build_s": build_s,
                     "score_s": score_s, "auroc_soft_label": auroc(out["soft_label"], bench.clean),
                     **agreement(flat, out)})
    return {"data": str(data_dir), "pairs": len(keys), "noise": noise, "epochs": epochs, "fit_s": fit_s,
            "anchors": len(model.anchor_keys), "rows": rows}


def caption_recall(data_dir: Path, cache_dir: Path, bank_rows: int, nlists: list[int], nprobes: list[int],
                   seed: int = 0) -> dict[str, Any]:
    """IVF vs exact nearest anchor on real embeddings: every Flickr8k caption's (centred, unit) MiniLM vector,
    `bank_rows` of them as the bank and the rest as queries. No model: this is the index's own recall on data
    with a real neighbourhood structure (synthetic Gaussian pairs have none, the worst case for IVF)."""
    import torch

    from bicro_clean.lab.evaluate import load_benchmark
    from bicro_clean.models.anchors import AnchorIndex, nearest_anchor

    bench = load_benchmark(data_dir, 0.0, seed, cache_dir)
    text = np.concatenate([bench.train_text, bench.test_text]).astype(np.float32)
    text -= text.mean(axis=0)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    order = np.random.default_rng(seed).permutation(len(text))
    bank, queries = torch.from_numpy(text[order[:bank_rows]]), torch.from_numpy(text[order[bank_rows:]])
    own = np.full(len(queries), -1, dtype=np.int64)
    exact = nearest_anchor(queries, bank, own)
    best = (queries * bank[torch.from_numpy(exact)]).sum(dim=1)
    rows = []
    for nlist in nlists:
        for nprobe in nprobes:
            got = nearest_anchor(queries, bank, own, AnchorIndex.build(bank, "ivf", nlist, nprobe, seed))
            found = (queries * bank[torch.from_numpy(got)]).sum(dim=1)
            rows.append({"nlist": nlist, "nprobe": nprobe, "same_anchor": float(np.mean(got == exact)),
                         "mean_cosine_lost": float((best - found).mean())})
    return {"bank": bank_rows, "queries": len(queries), "rows": rows}


def recall_table(result: dict[str, Any]) -> str:
    lines = ["| nlist | nprobe | same nearest anchor as exact | mean cosine lost |", "|---|---|---|---|"]
    lines += [f"| {r['nlist']} | {r['nprobe']} | {r['same_anchor']:.4f} | {r['mean_cosine_lost']:.5f} |"
              for r in result["rows"]]
    return "\n".join(lines)


def markdown_table(result: dict[str, Any]) -> str:
    head = ("| index | nlist | nprobe | same anchor i2t / t2i | mean abs diff consistency / soft_label "
            "| same keep decision | AUROC soft_label | build s | score s |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in result["rows"]:
        if r["index"] == "flat":
            lines.append(f"| flat | - | - | 1 / 1 | 0 / 0 | 1 | {r['auroc_soft_label']:.4f} | {r['build_s']:.1f} "
                         f"| {r['score_s']:.1f} |")
        else:
            lines.append(f"| ivf | {r['nlist']} | {r['nprobe']} | {r['same_anchor_i2t']:.3f} / "
                         f"{r['same_anchor_t2i']:.3f} | {r['consistency_mean_abs_diff']:.4f} / "
                         f"{r['soft_label_mean_abs_diff']:.4f} | {r['same_keep_decision']:.4f} | "
                         f"{r['auroc_soft_label']:.4f} | {r['build_s']:.1f} | {r['score_s']:.1f} |")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="IVF vs flat anchor search on Flickr8k")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/bicro-clean"))
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nprobe", default="4,8,16,32")
    parser.add_argument("--nlist", default="0")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--recall", action="store_true", help="index recall on real caption embeddings, no model")
    parser.add_argument("--bank", type=int, default=30_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.recall:
        nlists = [int(x) for x in args.nlist.split(",")]
        result = caption_recall(args.data, args.cache, args.bank, nlists, [int(x) for x in args.nprobe.split(",")])
        emit(result, recall_table(result), args.out)
        return
    result = run(args.data, args.cache, args.noise, args.epochs, [int(x) for x in args.nprobe.split(",")],
                 int(args.nlist))
    emit(result, markdown_table(result), args.out)


if __name__ == "__main__":
    main()
