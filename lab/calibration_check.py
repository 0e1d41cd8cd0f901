"""Is clean_score calibrated on a Flickr8k benchmark? The fit of a run, on the benchmark's cached embeddings.

    python -m bicro_clean.lab.calibration_check --noise-kind mix [--pairs N] [--calibration-folds K] [--data DIR]

fits BiCro with the defaults on the first N training pairs (all by default; the pipeline's fit sample holds every
pair of a crawl this size) and prints one JSON line as `lab.run_quality` does for a run: AUROC, the mean clean_score
against the true clean share, and the precision of the pairs kept at the default threshold, measured and expected
(their mean clean_score, as the report and the run summary state it), overall and per noise kind. The truth is
used only to measure.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np

from bicro_clean.lab.evaluate import detection_by_kind, load_benchmark
from bicro_clean.lab.metrics import auroc
from bicro_clean.models.params import BiCroParams
from bicro_clean.models.train import fit_bicro
from bicro_clean.pipeline.noise_kinds import resolve_rates

logger = logging.getLogger(__name__)
THRESHOLD = 0.5  # select.threshold's default


def calibration_figures(score: np.ndarray, clean: np.ndarray, kind: np.ndarray) -> dict:
    kept = score >= THRESHOLD
    out = {"pairs": len(score), "truly_clean": round(float(clean.mean()), 4), "auroc": round(auroc(score, clean), 4),
           "mean_clean_score": round(float(score.mean()), 4),
           "mean_error": round(float(score.mean() - clean.mean()), 4),
           "kept": int(kept.sum()), "precision_kept": round(float(clean[kept].mean()), 4),
           "expected_precision_kept": round(float(score[kept].mean()), 4),
           "expected_precision_error": round(float(score[kept].mean() - clean[kept].mean()), 4)}
    for name, figures in detection_by_kind(kind, {"score": score}).items():
        out[f"auroc_{name}"] = round(figures["auroc_score"], 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/flickr8k", help="the Flickr8k folder (fetch flickr8k)")
    parser.add_argument("--noise-kind", default="shuffle", help="shuffle | near-miss | alt-text | mix")
    parser.add_argument("--noise-rate", type=float, default=None, help="single kinds: the rate (default 0.4)")
    parser.add_argument("--pairs", type=int, default=0, help="the first N training pairs (0 = all 30,455)")
    parser.add_argument("--calibration-folds", type=int, default=None, help="bicro.calibration_folds (default: its default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=".cache/bicro-clean")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rate = args.noise_rate if args.noise_rate is not None or args.noise_kind == "mix" else 0.4
    rates = resolve_rates(args.noise_kind, rate)
    bench = load_benchmark(args.data, rates, args.seed, args.cache_dir)
    n = args.pairs or len(bench.train_image)
    params = BiCroParams(seed=args.seed) if args.calibration_folds is None else \
        BiCroParams(seed=args.seed, calibration_folds=args.calibration_folds)
    _, outputs = fit_bicro(bench.train_image[:n], bench.train_text[:n], params)
    figures = calibration_figures(outputs["clean_score"], bench.clean[:n], bench.kinds()[:n])
    print(json.dumps({"noise_kind": args.noise_kind, "calibration_folds": params.calibration_folds} | figures))


if __name__ == "__main__":
    main()
