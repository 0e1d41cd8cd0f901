"""How well a finished run's scores match the ground truth its shards carry (`make-shards` writes `truth_clean`).

    python -m bicro_clean.lab.run_quality OUT [--fraction 0.6]

prints one JSON line: AUROC of each score column, the mean clean_score against the true clean share, the precision
of the top `fraction` by clean_score and of the pairs the run kept (measured, and expected: their mean clean_score,
as the report and the run summary state it), and how many distinct clean_score values there are. The README's and docs/bicro.md's pipeline-path figures come from it.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import polars as pl

from bicro_clean.lab.metrics import auroc

COLUMNS = ("clean_score", "soft_label", "p_clean", "match_score", "encoder_cosine")


def run_quality(out: str, fraction: float = 0.6) -> dict:
    rows = pl.read_parquet(f"{out}/annotated/*.parquet").filter(pl.col("decision") != "error")
    truth = rows["truth_clean"].to_numpy().astype(bool)
    score = rows["clean_score"].to_numpy()
    top = np.argsort(-score, kind="stable")[: int(math.floor(fraction * len(score)))]
    kept = (rows["decision"] == "keep").to_numpy()
    result = {"pairs": rows.height, "truly_clean": round(float(truth.mean()), 4)}
    for column in COLUMNS:
        values = rows[column].to_numpy()
        if not np.isnan(values.astype(float)).all():
            result[f"auroc_{column}"] = round(auroc(values, truth), 4)
    expected = float(score[kept].mean()) if kept.any() else math.nan
    result |= {"mean_clean_score": round(float(score.mean()), 4),
               "mean_error": round(float(score.mean() - truth.mean()), 4),
               f"precision_top_{fraction:g}": round(float(truth[top].mean()), 4),
               "kept": int(kept.sum()), "precision_kept": round(float(truth[kept].mean()), 4),
               # what the report and the run summary promise for the kept pairs, without labels
               "expected_precision_kept": round(expected, 4),
               "expected_precision_error": round(expected - float(truth[kept].mean()), 4),
               "distinct_clean_score": int(len(np.unique(score)))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a finished run's --out folder")
    parser.add_argument("--fraction", type=float, default=0.6, help="precision of this top fraction by clean_score")
    args = parser.parse_args()
    print(json.dumps(run_quality(args.out, args.fraction)))


if __name__ == "__main__":
    main()
