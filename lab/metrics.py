"""The lab's one AUROC: how well a score ranks truly clean pairs above mismatched ones."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `score` for the boolean `positive` class (clean = positive everywhere in the
    lab). NaN when only one class is present: a run without injected noise has no ranking to judge."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(score)))
