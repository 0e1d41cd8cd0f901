"""The limit probe's own arithmetic: per-kind AUROC and the anchor margins (the Flickr8k runs are docs figures)."""

import types

import numpy as np
import pytest
import torch

from bicro_clean.lab.evidence_ceiling import anchor_margins, summary


def test_summary_gives_auroc_per_kind_and_the_clean_share_of_the_top():
    clean = np.array([True] * 6 + [False] * 4)
    kind = np.array(["clean"] * 6 + ["shuffle", "shuffle", "near-miss", "near-miss"])
    # shuffle pairs below every clean pair, near-miss pairs above every clean pair
    score = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.1, 0.2, 0.99, 0.98])
    row = summary("s", score, clean, kind)
    assert row["auroc_shuffle"] == 1.0 and row["auroc_near-miss"] == 0.0
    assert row["auroc"] == pytest.approx(0.5)
    assert row["clean_in_top_0.6"] == pytest.approx(4 / 6, abs=1e-4)  # top 6: both near-miss pairs and 4 clean ones


def _identity_model(anchor_img: torch.Tensor, anchor_txt: torch.Tensor) -> types.SimpleNamespace:
    net = types.SimpleNamespace(embed_images=lambda x: x, embed_texts=lambda x: x)
    return types.SimpleNamespace(nets=[net], anchor_img=anchor_img, anchor_txt=anchor_txt,
                                 consistency_embeddings=lambda i, t: (i[0], t[0]))


def test_anchor_margins_compare_the_pair_with_its_best_other_anchor():
    anchor_img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    anchor_txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    model = _identity_model(anchor_img, anchor_txt)
    image = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    text = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    # pair 0 is anchor row 0: its own row is skipped; pair 1 is no anchor
    out = anchor_margins(model, image, text, np.array([0, -1]))
    # pair 0: cosine 1; best other anchor caption for its image: row 1 (0.6); best other anchor image for its
    # caption: row 1 (0.0)
    assert out[0].tolist() == pytest.approx([1.0 - 0.6, 1.0 - 0.0])
    # pair 1: cosine 0; its image's best anchor caption 0.8 (row 1); its caption's best anchor image 1.0 (row 0)
    assert out[1].tolist() == pytest.approx([0.0 - 0.8, 0.0 - 1.0])
