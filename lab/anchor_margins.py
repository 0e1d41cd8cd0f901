"""What the anchor margins (models/margins.py, `bicro.anchor_margins`) buy and cost on a Flickr8k benchmark: the
measurements behind docs/bicro.md#anchor-margins.

    python -m bicro_clean.lab.anchor_margins --data DIR [--noise-kind mix] [--pairs 8192] [--repeats 4]
                                             [--calibration-folds K]

fits BiCro once with the defaults and `anchor_margins: on` (the networks and anchors do not depend on the setting;
only clean_score's evidence does), then prints JSON lines:

- `clean_score` with margins off and on: clean_score fitted on the same networks' evidence, its first 5 columns
  (what `off` fits) or all 7, by the same calibration (cross-fitted as the fit did); AUROC overall, per noise kind,
  and the mean clean_score;
- `agreement`: the margins as scored (the CPU's anchor index, "pca" on Flickr8k) against an exact search over every
  anchor: the share of pairs with the same margin, and the clean_score AUROC with exact margins;
- `cost`: `BiCroModel.score` on `--pairs` pairs with margins off and on, the same loaded model and indexes, run in
  turn (off, on, on, off, ...): median process CPU seconds and wall seconds, and the paired on/off CPU ratio.

`--checkpoint CKPT --embeddings OUT/embeddings` runs only the cost step, on a saved checkpoint and a run's pairs.
Labels choose nothing; they only measure.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import numpy as np

from bicro_clean.lab.evaluate import load_benchmark
from bicro_clean.lab.evidence_ceiling import anchor_margins as exact_margins
from bicro_clean.lab.evidence_ceiling import summary
from bicro_clean.models import train
from bicro_clean.models.bicro import BiCroModel
from bicro_clean.models.calibration import OutOfFold, cross_fitted
from bicro_clean.models.clean_score import EVIDENCE, CleanScorer
from bicro_clean.models.cotrain import torch_threads
from bicro_clean.models.params import BiCroParams
from bicro_clean.pipeline.noise_kinds import resolve_rates

logger = logging.getLogger(__name__)
BASE = len(EVIDENCE)


def fit_recording(image: np.ndarray, text: np.ndarray, params: BiCroParams) -> tuple[BiCroModel, dict, dict]:
    """fit_bicro, keeping the evidence its calibration saw: the training pairs' (observed, reference) and the
    cross-fitting's OutOfFold when it cross-fitted."""
    seen: dict[str, Any] = {}
    evidence_and_reference, out_of_fold = train.evidence_and_reference, train.out_of_fold

    def record_evidence(model, im, tx, keys, seed):  # noqa: ANN001, ANN202
        result = evidence_and_reference(model, im, tx, keys, seed)
        if keys is not None and len(keys) == len(image) and "full" not in seen:
            seen["full"] = result[1:]
        return result

    def record_folds(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen["oof"] = out_of_fold(*args, **kwargs)
        return seen["oof"]

    train.evidence_and_reference, train.out_of_fold = record_evidence, record_folds
    try:
        model, outputs = train.fit_bicro(image, text, params)
    finally:
        train.evidence_and_reference, train.out_of_fold = evidence_and_reference, out_of_fold
    return model, dict(outputs), seen


def scorer_without_margins(seen: dict) -> CleanScorer:
    """clean_score as `anchor_margins: off` fits it from the same evidence: its first 5 columns."""
    observed, reference = (m[:, :BASE] for m in seen["full"])
    full = CleanScorer.fit(observed, reference)
    if "oof" not in seen:
        return full
    return cross_fitted(full, observed, OutOfFold(seen["oof"].observed[:, :BASE], seen["oof"].reference[:, :BASE]))


def quality(model: BiCroModel, outputs: dict, seen: dict, image: np.ndarray, text: np.ndarray, clean: np.ndarray,
            kind: np.ndarray) -> list[dict]:
    observed = seen["full"][0]
    off = scorer_without_margins(seen)(observed[:, :BASE])
    rows = [summary("clean_score_margins_off", off, clean, kind) | {"mean": round(float(off.mean()), 4)},
            summary("clean_score_margins_on", outputs["clean_score"], clean, kind)
            | {"mean": round(float(outputs["clean_score"].mean()), 4)}]
    pos = {key: i for i, key in enumerate(model.anchor_keys)}
    own = np.array([pos.get(str(i), -1) for i in range(len(image))], dtype=np.int64)
    with torch_threads(model.params.threads):
        exact = exact_margins(model, image, text, own)
    scored = np.column_stack([outputs["margin_i2t"], outputs["margin_t2i"]])
    same = np.abs(scored - exact) < 1e-5
    with_exact = model.clean_scorer(np.column_stack([observed[:, :BASE], exact]))
    rows.append({"score": "agreement", "index": model.scoring_state().indexes[0].kind,
                 "anchors": len(model.anchor_keys), "same_margin_i2t": round(float(same[:, 0].mean()), 4),
                 "same_margin_t2i": round(float(same[:, 1].mean()), 4),
                 "auroc_exact_margins": summary("exact", with_exact, clean, kind)["auroc"]})
    return rows


def cost(model: BiCroModel, off_scorer: CleanScorer | None, image: np.ndarray, text: np.ndarray, pairs: int,
         repeats: int, seed: int) -> dict:
    """Paired CPU timing of model.score with the margins off and on (same indexes, built before timing)."""
    rows = np.random.default_rng(seed).choice(len(image), min(pairs, len(image)), replace=False)
    im, tx, keys = image[rows], text[rows], [str(i) for i in rows]
    settings = {"on": (model.params, model.clean_scorer),
                "off": (model.params.model_copy(update={"anchor_margins": "off"}), off_scorer)}
    model.scoring_state()
    model.score(im[:1024], tx[:1024], keys[:1024])  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for r in range(repeats):
        for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
            model.params, model.clean_scorer = settings[name]
            cpu, wall = time.process_time(), time.perf_counter()
            model.score(im, tx, keys)
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    model.params, model.clean_scorer = settings["on"]
    out: dict[str, Any] = {"score": "cost", "pairs": len(rows), "threads": model.params.threads}
    for name, runs in times.items():
        out[f"{name}_cpu_s"] = round(float(np.median([c for c, _ in runs])), 2)
        out[f"{name}_wall_s"] = round(float(np.median([w for _, w in runs])), 2)
    out["on_over_off_cpu"] = round(float(np.median([a[0] / b[0] for a, b in zip(times["on"], times["off"])])), 3)
    return out


def checkpoint_cost(checkpoint: str, embeddings: str, pairs: int, repeats: int, seed: int) -> dict:
    """`cost` for a saved checkpoint on a run's embeddings: its own evidence layout for one setting, the margins
    computed (on) or not (off) for the other; clean_score is left out of the timing of the setting it lacks."""
    import pyarrow.dataset as ds

    from bicro_clean.pipeline.score import fixed_list_matrix

    table = ds.dataset(embeddings, format="parquet").to_table(filter=ds.field("status") == "ok")
    image, text = fixed_list_matrix(table["image_emb"]), fixed_list_matrix(table["text_emb"])
    model = BiCroModel.load(checkpoint)
    stored = model.clean_scorer
    model.params = model.params.model_copy(update={"anchor_margins": "on"})
    model.clean_scorer = stored if len(stored.weights) > BASE else None
    off = stored if len(stored.weights) == BASE else None
    kind = model.scoring_state().indexes[0].kind if model.scoring_state().indexes else "-"
    return cost(model, off, image, text, pairs, repeats, seed) | {"anchors": len(model.anchor_keys), "index": kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/flickr8k")
    parser.add_argument("--noise-kind", default="mix", choices=("shuffle", "near-miss", "alt-text", "mix"))
    parser.add_argument("--noise-rate", type=float, default=0.4, help="one kind's rate (mix: the README's 15/15/10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=".cache/bicro-clean")
    parser.add_argument("--pairs", type=int, default=8192, help="pairs per timed score() call")
    parser.add_argument("--repeats", type=int, default=4, help="timed calls per setting")
    parser.add_argument("--calibration-folds", type=int, default=None, help="bicro.calibration_folds (default: its)")
    parser.add_argument("--checkpoint", help="only the cost: score with this checkpoint (margins timed on and off)")
    parser.add_argument("--embeddings", help="with --checkpoint: a run's embeddings/ folder, the pairs to score")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.checkpoint:
        print(json.dumps(checkpoint_cost(args.checkpoint, args.embeddings, args.pairs, args.repeats, args.seed)))
        return
    rates = resolve_rates(args.noise_kind, None if args.noise_kind == "mix" else args.noise_rate)
    bench = load_benchmark(args.data, rates, args.seed, args.cache_dir)
    image = np.ascontiguousarray(bench.train_image, dtype=np.float32)
    text = np.ascontiguousarray(bench.train_text, dtype=np.float32)
    start = time.perf_counter()
    folds = {} if args.calibration_folds is None else {"calibration_folds": args.calibration_folds}
    model, outputs, seen = fit_recording(image, text, BiCroParams(seed=args.seed, anchor_margins="on", **folds))
    print(json.dumps({"score": "fit", "pairs": len(image), "seconds": round(time.perf_counter() - start)}), flush=True)
    for row in quality(model, outputs, seen, image, text, bench.clean, bench.kinds()):
        print(json.dumps(row), flush=True)
    print(json.dumps(cost(model, scorer_without_margins(seen), image, text, args.pairs, args.repeats, args.seed)),
          flush=True)


if __name__ == "__main__":
    main()
