"""lab.run_quality: truth figures of a finished run, from its annotated Parquet."""

import json

import numpy as np
import polars as pl

from bicro_clean.lab.run_quality import run_quality


def test_figures_from_an_annotated_folder(tmp_path):
    (tmp_path / "annotated").mkdir()
    truth = np.array([True, True, True, False, False, True])
    score = np.array([0.9, 0.8, 0.3, 0.4, 0.1, 0.7])
    frame = pl.DataFrame({"decision": ["keep", "keep", "drop", "drop", "drop", "keep"], "truth_clean": truth,
                          "clean_score": score, "soft_label": score.astype(np.float32),
                          "p_clean": score.astype(np.float32), "match_score": score.astype(np.float32),
                          "encoder_cosine": pl.Series([None] * 6, dtype=pl.Float32)})
    error_row = frame.head(1).with_columns(pl.lit("error").alias("decision"), pl.lit(False).alias("truth_clean"))
    pl.concat([frame, error_row]).write_parquet(tmp_path / "annotated" / "a.parquet")
    result = run_quality(str(tmp_path), fraction=0.5)
    assert result["pairs"] == 6 and result["auroc_clean_score"] == 0.875  # 7 of 8 clean/noisy pairs ordered
    assert "auroc_encoder_cosine" not in result  # all null: an unaligned encoder
    assert result["precision_top_0.5"] == 1.0 and result["kept"] == 3 and result["precision_kept"] == 1.0
    assert result["mean_clean_score"] == round(score.mean(), 4) and result["distinct_clean_score"] == 6
    json.dumps(result)
