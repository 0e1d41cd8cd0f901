"""How far a pair-level score can go on a Flickr8k benchmark with the towers: the measurements behind
docs/bicro.md#what-limits-clean_score.

    python -m bicro_clean.lab.evidence_ceiling --noise-kind mix [--noise-rate 0.4] [--data DIR]

fits BiCro with the defaults (as `evaluate` does), then prints one JSON line per score, each with its AUROC
overall and per noise kind and the share of truly clean pairs in its top 60%:

- `clean_score`: the product's score;
- `supervised_evidence`: a logistic regression fitted (5-fold, out of fold) on the TRUTH over clean_score's own
  evidence: what no unsupervised weighing of those columns can beat by much;
- `margins_pu` / `margins_supervised`: the same with two more columns, the pair's cosine minus its best
  cross-modal anchor (image vs the anchors' captions, caption vs the anchors' images, in the consistency space),
  weighed without labels (models.clean_score.CleanScorer) and with them;
- `oracle_memorised`: the cosine of matchers trained on the truly clean pairs only, scoring those same pairs;
- `oracle_out_of_fold`: the same matchers' recipe trained on half of the clean pairs, each clean pair scored by
  the half that did not train on it: what a clean-trained matcher knows about pairs it has not seen.

Labels choose nothing in the product; they are used here only to measure limits.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import torch

from bicro_clean.lab.evaluate import detection_by_kind, load_benchmark, pair_cosine
from bicro_clean.lab.metrics import auroc
from bicro_clean.models.baselines import fit_plain
from bicro_clean.models.bicro import BiCroModel
from bicro_clean.models.clean_score import EVIDENCE, CleanScorer, evidence_matrix
from bicro_clean.models.cotrain import torch_threads
from bicro_clean.models.params import BiCroParams
from bicro_clean.models.train import fit_bicro, reference_pairing
from bicro_clean.pipeline.noise_kinds import resolve_rates

logger = logging.getLogger(__name__)

TOP_FRACTION = 0.6
ROWS = 2048  # pairs per block of the anchor comparisons


def summary(name: str, score: np.ndarray, clean: np.ndarray, kind: np.ndarray) -> dict:
    """AUROC overall and of the clean pairs against each noise kind, and the clean share of the top 60%."""
    out: dict = {"score": name, "auroc": round(auroc(score, clean), 4)}
    for k, figures in detection_by_kind(kind, {"score": score}).items():
        out[f"auroc_{k}"] = round(figures["auroc_score"], 4)
    top = np.argsort(-score, kind="stable")[: int(TOP_FRACTION * len(score))]
    out[f"clean_in_top_{TOP_FRACTION:g}"] = round(float(clean[top].mean()), 4)
    return out


def out_of_fold_logistic(features: np.ndarray, clean: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    z = (features - features.mean(0)) / np.maximum(features.std(0), 1e-12)
    return cross_val_predict(LogisticRegression(max_iter=3000), z, clean, cv=5, method="decision_function")


def anchor_margins(model: BiCroModel, image: np.ndarray, text: np.ndarray, own: np.ndarray) -> np.ndarray:
    """(N, 2): the pair's cosine in the consistency space minus its best anchor caption (image side) and minus its
    best anchor image (caption side), never its own anchor row (`own`: the pair's row in the bank or -1)."""
    with torch.no_grad():
        ci, ct = model.consistency_embeddings([n.embed_images(torch.from_numpy(image)) for n in model.nets],
                                              [n.embed_texts(torch.from_numpy(text)) for n in model.nets])
    out = np.zeros((len(image), 2))
    for start in range(0, len(image), ROWS):
        part = slice(start, start + ROWS)
        pos = (ci[part] * ct[part]).sum(1)
        vs_captions, vs_images = ci[part] @ model.anchor_txt.T, ct[part] @ model.anchor_img.T
        mine = torch.from_numpy(own[part])
        rows = torch.nonzero(mine >= 0).flatten()
        vs_captions[rows, mine[rows]] = -2.0
        vs_images[rows, mine[rows]] = -2.0
        out[part, 0] = (pos - vs_captions.max(1).values).numpy()
        out[part, 1] = (pos - vs_images.max(1).values).numpy()
    return out


def clean_trained_cosines(image: np.ndarray, text: np.ndarray, clean: np.ndarray, params: BiCroParams,
                          seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine of matchers trained on every clean pair, out-of-fold cosine of matchers trained on half of them)."""
    def cosine(rows: np.ndarray) -> np.ndarray:
        nets = fit_plain(image, text, params, rows=rows)
        with torch_threads(params.threads):
            return pair_cosine(nets, image, text, "cpu")

    good = np.flatnonzero(clean)
    memorised = cosine(good)
    fold = np.random.default_rng(seed).integers(0, 2, len(clean))
    total, count = np.zeros(len(clean)), np.zeros(len(clean))
    for f in (0, 1):
        scores = cosine(good[fold[good] == f])
        unseen = (fold != f) | ~clean
        total[unseen] += scores[unseen]
        count[unseen] += 1
    return memorised, total / count


def probe(data: str, noise_kind: str, noise_rate: float, seed: int, cache_dir: str) -> list[dict]:
    rates = resolve_rates(noise_kind, None if noise_kind == "mix" else noise_rate)
    bench = load_benchmark(data, rates, seed, cache_dir)
    image = np.ascontiguousarray(bench.train_image, dtype=np.float32)
    text = np.ascontiguousarray(bench.train_text, dtype=np.float32)
    clean, kind = bench.clean, bench.kinds()
    params = BiCroParams(seed=seed)
    model, outputs = fit_bicro(image, text, params)
    results = [summary("clean_score", outputs["clean_score"], clean, kind)]
    evidence = evidence_matrix({name: outputs[name] for name, _ in EVIDENCE})
    results.append(summary("supervised_evidence", out_of_fold_logistic(evidence, clean), clean, kind))

    perm = reference_pairing(len(image), seed)
    own = np.full(len(image), -1, dtype=np.int64)
    own[[int(k) for k in model.anchor_keys]] = np.arange(len(model.anchor_keys))
    with torch_threads(params.threads):
        observed = np.column_stack([evidence, anchor_margins(model, image, text, own)])
        reference = np.column_stack([evidence_matrix(model.score(image[perm], text)),
                                     anchor_margins(model, image[perm], text, np.full(len(image), -1))])
    scorer = CleanScorer.fit(observed, reference)
    results.append(summary("margins_pu", scorer(observed), clean, kind) | {"clean_share": round(scorer.clean_share, 3)})
    results.append(summary("margins_supervised", out_of_fold_logistic(observed, clean), clean, kind))

    memorised, unseen = clean_trained_cosines(image, text, clean, params, seed)
    results.append(summary("oracle_memorised", memorised, clean, kind))
    results.append(summary("oracle_out_of_fold", unseen, clean, kind))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/flickr8k")
    parser.add_argument("--noise-kind", default="mix", choices=("shuffle", "near-miss", "alt-text", "mix"))
    parser.add_argument("--noise-rate", type=float, default=0.4, help="one kind's rate (mix: the README's 15/15/10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=".cache/bicro-clean")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for row in probe(args.data, args.noise_kind, args.noise_rate, args.seed, args.cache_dir):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
