"""Training speed-ups that must not change results: known row groups, the fused optimiser, lazy outputs."""

import numpy as np
import pytest
import torch

from bicro_clean.models.bicro import BiCroModel
from bicro_clean.models.cotrain import PairData, TrainConfig, embed_pairs, make_adamw
from bicro_clean.models.forward import row_hashes
from bicro_clean.models.matcher import Matcher
from bicro_clean.models.params import BiCroParams
from bicro_clean.models.train import fit_bicro, query_groups, reference_pairing


def _pairs(n_img: int = 40, per: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n_img, 12)).astype(np.float32)[np.repeat(np.arange(n_img), per)]
    text = rng.normal(size=(n_img * per, 10)).astype(np.float32)
    return image, text


def test_embed_pairs_with_known_groups_equals_hashing_the_rows():
    image, text = _pairs()
    data = PairData.build(image, text, "cpu")
    torch.manual_seed(0)
    net = Matcher(12, 10, 8, 16)
    with torch.no_grad():  # a non-zero residual layer, so the MLP takes part
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hashed = embed_pairs(net, data.image, data.text)
    known = embed_pairs(net, data.image, data.text, (data.image_rows, data.text_rows))
    assert all(torch.equal(a, b) for a, b in zip(hashed, known))
    (img_first, img_inv), (txt_first, txt_inv) = query_groups(data)
    assert len(img_first) == 40 and len(txt_first) == 120
    assert np.array_equal(row_hashes(image[img_first][img_inv]), row_hashes(image))


def test_optimiser_is_fused_on_cpu():
    cfg = BiCroParams().train_config()
    assert isinstance(cfg, TrainConfig)
    opt = make_adamw(Matcher(12, 10, 8, 16), cfg, torch.device("cpu"))
    assert opt.defaults["fused"] is True


def test_fit_outputs_are_the_model_scores_with_clean_score():
    image, text = _pairs(n_img=20, per=4)
    params = BiCroParams(epochs=2, batch_size=16, embed_dim=8, hidden_dim=16, bank_size=16, top_anchors=4, threads=1)
    model, out = fit_bicro(image, text, params)
    again = model.score(image, text, [str(i) for i in range(80)])
    assert np.array_equal(out["soft_label"], again["soft_label"])
    assert np.array_equal(out["clean_score"], again["clean_score"]) and out["clean_score"].dtype == np.float64
    assert 0 <= out["clean_score"].min() and out["clean_score"].max() <= 1


@pytest.mark.parametrize("n", [2, 3, 7, 1000])
def test_reference_pairing_never_gives_a_caption_its_own_image(n):
    for seed in range(20):
        perm = reference_pairing(n, seed)
        assert sorted(perm.tolist()) == list(range(n)) and not np.any(perm == np.arange(n))
