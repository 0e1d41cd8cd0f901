import numpy as np
import pytest
import torch

from bicro_clean.lab.evaluate import detection, retrieval
from bicro_clean.models.baselines import ncr_predict
from bicro_clean.models.losses import default_negatives


def test_retrieval_hand_computed():
    # 2 images x 4 captions; captions 0,1 belong to image 0 and 2,3 to image 1
    caption_image = np.array([0, 0, 1, 1])
    sims = np.array(
        [
            [0.1, 0.9, 0.8, 0.2],  # image 0: best caption 1 is its own -> rank 0
            [0.7, 0.1, 0.2, 0.3],  # image 1: ranking 0, 3, 2, 1 -> own caption 3 at rank 1
        ]
    )
    got = retrieval(sims, caption_image, ks=(1, 2))
    assert got["i2t"] == [50.0, 100.0]
    # captions: c0 -> image 1 first (0.7 > 0.1): rank 1; c1 -> image 0: rank 0; c2 -> image 0 first: rank 1;
    # c3 -> image 1 (0.3 > 0.2): rank 0
    assert got["t2i"] == [50.0, 100.0]
    assert got["rsum"] == pytest.approx(300.0)


def test_detection_metrics():
    clean = np.array([True, True, True, False, False])
    soft = np.array([0.9, 0.8, 0.4, 0.6, 0.1])
    got = detection(clean, soft, soft)
    # keep = [1, 1, 0, 1, 0]: tp 2, kept 3, clean 3
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3)
    assert got["est_noise_rate"] == pytest.approx(0.4)
    assert got["auroc_soft_label"] == pytest.approx(5 / 6)
    none = detection(clean, None, None)
    assert all(v is None for v in none.values())


def test_ncr_predict_is_scaled_confidence():
    sims = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.4], [0.1, 0.0, 0.8]])
    p = ncr_predict(sims, default_negatives(3), alpha=0.2)
    # pairs 0 and 2 have no hinge: p = alpha = 0.2. Pair 1: image term [0.1, 0.3] mean 0.2, caption term
    # [0, 0] mean 0 -> p = 0.2 - (0.2 + 0) / 2 = 0.1. Scaled by the mean of the top 3 // 10 + 1 = 1 value (0.2).
    assert p.tolist() == pytest.approx([1.0, 0.5, 1.0])
