import math

import pytest
import torch

from bicro_clean.models.losses import (
    bank_mean_hinge,
    default_negatives,
    hardest_triplet,
    mean_triplet,
    small_loss_mean,
    soft_margin,
)

# rows: images, columns: captions; S[i, i] is pair i
SIMS = torch.tensor(
    [
        [0.9, 0.5, 0.2],
        [0.4, 0.6, 0.7],
        [0.1, 0.3, 0.8],
    ]
)
MARGINS = torch.tensor([0.2, 0.3, 0.05])


def test_soft_margin_values():
    y = torch.tensor([0.0, 0.5, 1.0])
    got = soft_margin(y, alpha=0.2, base=10.0)
    want = torch.tensor([0.0, 0.2 * (math.sqrt(10.0) - 1.0) / 9.0, 0.2])
    assert torch.allclose(got, want, atol=1e-6)


def test_hardest_triplet_uses_each_pairs_own_margin_in_both_directions():
    # pair 0: image term max(0.2+0.5-0.9, 0.2+0.2-0.9) < 0; caption term max(0.2+0.4-0.9, 0.2+0.1-0.9) < 0 -> 0
    # pair 1: image term: own margin 0.3 + S[1,2]=0.7 - 0.6 = 0.4 (the negative caption's margin 0.05 would
    #         give 0.15); caption term: 0.3 + S[0,1]=0.5 - 0.6 = 0.2 -> 0.6
    # pair 2: image term 0.05 + 0.3 - 0.8 < 0; caption term: own 0.05 + S[1,2]=0.7 - 0.8 < 0 (the negative
    #         image's margin 0.3 would give 0.2) -> 0
    got = hardest_triplet(SIMS, MARGINS, default_negatives(3))
    assert torch.allclose(got, torch.tensor([0.0, 0.6, 0.0]), atol=1e-6)


def test_hardest_triplet_respects_negative_mask():
    neg = default_negatives(3)
    neg[1, 2] = False  # image 1 and caption 2 share a photo: not a negative pair
    # pair 1: image term only caption 0: 0.3 + 0.4 - 0.6 = 0.1; caption term 0.2 -> 0.3
    got = hardest_triplet(SIMS, MARGINS, neg)
    assert torch.allclose(got, torch.tensor([0.0, 0.3, 0.0]), atol=1e-6)


def test_mean_triplet_hand_computed():
    margins = torch.full((3,), 0.2)
    # pair 1: image: [0.2+0.4-0.6, 0.2+0.7-0.6] -> [0, 0.3], mean 0.15; caption: [0.2+0.5-0.6, 0.2+0.3-0.6]
    #         -> [0.1, 0], mean 0.05 -> 0.2
    # pair 2: image: [0.2+0.1-0.8, 0.2+0.3-0.8] -> 0; caption: [0.2+0.2-0.8, 0.2+0.7-0.8] -> [0, 0.1] mean 0.05
    got = mean_triplet(SIMS, margins, default_negatives(3))
    assert torch.allclose(got, torch.tensor([0.0, 0.2, 0.05]), atol=1e-6)


def test_small_loss_mean_keeps_smallest():
    per = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 0.0, 9.0, 8.0, 7.0, 6.0])
    assert small_loss_mean(per, 0.3).item() == pytest.approx(1.0)  # mean of 0, 1, 2
    assert small_loss_mean(per, 1.0).item() == pytest.approx(per.mean().item())


def test_bank_mean_hinge_hand_computed():
    pos = torch.tensor([0.5])
    s_t = torch.tensor([[0.6, 0.1, 0.9]])  # S(I_n, T_k)
    s_v = torch.tensor([[0.2, 0.45, 0.9]])  # S(I_k, T_n)
    valid = torch.tensor([[1.0, 1.0, 0.0]])  # bank entry 2 shares the photo: ignored
    # costs: t = [0.3, 0], v = [0, 0.15] over 2 valid entries -> 0.45 / 2
    got = bank_mean_hinge(pos, s_t, s_v, 0.2, valid)
    assert got.item() == pytest.approx(0.225, abs=1e-6)
