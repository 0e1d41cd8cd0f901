import numpy as np
import pytest
import torch

from bicro_clean.models.bicro import BiCroModel
from bicro_clean.models.consistency import consistency_labels, consistency_space, soft_labels, top_anchor_mask
from bicro_clean.models.cotrain import Division
from bicro_clean.models.mixture import BetaMixture
from bicro_clean.models.params import BiCroParams
from bicro_clean.models.train import fit_bicro, labels_from_division


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# anchor bank in a 2-d space: A0, A1, A2
ANCHOR_IMG = _t([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
ANCHOR_TXT = _t([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])


def test_consistency_hand_computed_with_negative_cosine_and_self_exclusion():
    img = _t([[0.8, 0.6], [0.6, 0.8], [0.8, -0.6]])
    txt = _t([[0.6, 0.8], [0.8, 0.6], [1.0, 0.0]])
    self_index = np.array([-1, 1, -1])  # pair 1 IS anchor A1
    c, r_i2t, r_t2i, a_img, a_txt = consistency_labels(img, txt, ANCHOR_IMG, ANCHOR_TXT, self_index)
    # pair 0: image nearest A1 (0.96): u=0.96, v=cos((.6,.8),(.8,.6))=0.96 -> 1
    #         text nearest A2 (1.0): u=cos((.8,.6),(-1,0))=-0.8 <= 0 -> 0
    # pair 1: own anchor A1 excluded; image nearest A0 (0.6): u=0.6, v=0.8 -> 0.75
    #         text nearest A2 (0.96): u=-0.6 -> 0
    # pair 2: image nearest A0 (0.8): u=0.8, v=1 -> 0.8; text nearest A0 (1.0): u=0.8, v=1 -> 0.8
    assert a_img.tolist() == [1, 0, 0]
    assert a_txt.tolist() == [2, 2, 0]
    assert torch.allclose(r_i2t, _t([1.0, 0.75, 0.8]), atol=1e-6)
    assert torch.allclose(r_t2i, _t([0.0, 0.0, 0.8]), atol=1e-6)
    assert torch.allclose(c, _t([0.5, 0.375, 0.8]), atol=1e-6)


def test_without_self_exclusion_a_pair_would_be_its_own_anchor():
    img, txt = ANCHOR_IMG[1:2], ANCHOR_TXT[1:2]
    c, _, _, a_img, a_txt = consistency_labels(img, txt, ANCHOR_IMG, ANCHOR_TXT, None)
    assert a_img.item() == 1 and a_txt.item() == 1 and c.item() == pytest.approx(1.0)
    c, _, _, a_img, _ = consistency_labels(img, txt, ANCHOR_IMG, ANCHOR_TXT, np.array([1]))
    assert a_img.item() == 0


def test_duplicate_anchor_rows_fall_back_to_the_duplicate_not_self():
    bank_img = _t([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # one photo, two anchor captions
    bank_txt = _t([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    c, r_i2t, _, a_img, _ = consistency_labels(bank_img[:1], bank_txt[:1], bank_img, bank_txt, np.array([0]))
    assert a_img.item() == 1
    assert r_i2t.item() == pytest.approx(0.6)  # u = 1, v = 0.6
    # a query that is not an anchor: ties between duplicates go to the lower index
    _, _, _, a_img, _ = consistency_labels(bank_img[:1], bank_txt[:1], bank_img, bank_txt, np.array([-1]))
    assert a_img.item() == 0


def test_soft_label_rules():
    p = np.array([0.9, 0.9, 0.2, 0.2])
    c = np.array([0.4, 0.6, 0.7, 0.3])
    got = soft_labels(p, c, np.array([True, False, False, False]), clean_threshold=0.5, tau=0.5)
    assert np.allclose(got, [1.0, 0.8, 0.7, 0.0])


def test_top_anchor_mask():
    bank_index = np.array([0, 3, -1, 1, 2])
    assert top_anchor_mask(bank_index, 2).tolist() == [True, False, False, True, False]
    assert top_anchor_mask(bank_index, -1).tolist() == [True, True, False, True, True]
    assert not top_anchor_mask(bank_index, 0).any()


def test_consistency_space_centres_and_normalises():
    x = _t([[1.0, 1.0], [1.0, 0.8]])
    out = consistency_space(x, x.mean(dim=0))
    assert torch.allclose(out, _t([[0.0, 1.0], [0.0, -1.0]]), atol=1e-6)
    assert consistency_space(x, None) is x


def test_labels_from_division_hand_computed():
    # pair 0 and 1 share a photo; pair 2's caption matches pair 0's; pair 3 is in the noisy set
    img = _t([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    txt = _t([[1.0, 0.0], [0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])
    mix = BetaMixture(np.ones(2), np.ones(2), np.full(2, 0.5))
    div = Division(img, txt, np.zeros(4), 0.0, 1.0, mix, np.array([0.9, 0.8, 0.7, 0.1]))
    params = BiCroParams(top_anchors=1, center_consistency=False, train_consistency_floor=0.2)
    lab = labels_from_division(div, params)
    # bank = clean set by confidence [0, 1, 2]; pair n is never its own anchor.
    # pair 0: i2t -> duplicate photo row 1: u=1, v=0.8 -> 0.8; t2i -> pair 2's identical caption: u=0 -> 0
    # pair 1: i2t -> pair 0: 0.8; t2i -> pair 0 (0.8): u=1, v=0.8 -> 0.8
    # pair 2: i2t -> pair 0 (its own photo row is only itself): u=0 -> 0; t2i -> pair 0: u=0 -> 0
    # pair 3: i2t -> pair 2 (same photo): u=1, v=0 -> 0; t2i -> pair 1 (0.6): u=0 -> 0
    assert np.allclose(lab.consistency, [0.4, 0.8, 0.0, 0.0], atol=1e-6)
    assert np.allclose(lab.labels, [1.0, 0.9, 0.5, 0.0], atol=1e-6)  # top anchor, 0.5 + c/2, 0.5 + c/2, 0
    assert lab.clean.tolist() == [True, True, True, False]
    assert lab.train_clean.tolist() == [True, True, False, False]  # pair 2's consistency is under the floor


# ------------------------------------------------------------------------------------- fitted model


def _toy(n_img: int = 60, per: int = 4, noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_img, 8))
    img_of = np.repeat(np.arange(n_img), per)
    image = z[img_of] @ rng.normal(size=(8, 24)) + 0.05 * rng.normal(size=(len(img_of), 24))
    text = z[img_of] @ rng.normal(size=(8, 16)) + 0.3 * rng.normal(size=(len(img_of), 16))
    noisy = np.flatnonzero(rng.random(len(img_of)) < noise)
    image[noisy] = image[rng.permutation(noisy)]
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image.astype(np.float32), text.astype(np.float32)


PARAMS = BiCroParams(
    epochs=3, warmup_epochs=1, batch_size=32, embed_dim=16, hidden_dim=32, bank_size=48, lr=1e-3, top_anchors=20,
    threads=1,
)


@pytest.fixture(scope="module")
def fitted():
    image, text = _toy()
    keys = [f"k{i}" for i in range(len(image))]
    model, out = fit_bicro(image, text, PARAMS, keys=keys)
    return image, text, keys, model, out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_outputs_shapes_types_and_ranges(fitted):
    image, _, _, model, out = fitted
    n = len(image)
    for k in ("p_clean", "consistency", "r_i2t", "r_t2i", "soft_label", "match_score"):
        assert out[k].dtype == np.float32 and out[k].shape == (n,)
    for k in ("anchor_for_image", "anchor_for_text"):
        assert out[k].dtype == np.int64 and out[k].shape == (n,)
        assert out[k].min() >= 0 and out[k].max() < len(model.anchor_keys)
    assert 0 <= out["soft_label"].min() and out["soft_label"].max() <= 1
    assert 0 <= out["p_clean"].min() and out["p_clean"].max() <= 1


def test_fit_outputs_equal_score_and_anchors_never_self(fitted):
    image, text, keys, model, out = fitted
    assert _same(out, model.score(image, text, keys))
    pos = {k: i for i, k in enumerate(model.anchor_keys)}
    own = np.array([pos.get(k, -1) for k in keys])
    assert (own >= 0).any()
    assert not np.any(out["anchor_for_image"] == own)
    assert not np.any(out["anchor_for_text"] == own)


def test_score_independent_of_batch_composition(fitted):
    image, text, keys, model, out = fitted
    sub = np.array([5, 17, 3, 200, 64])
    alone = model.score(image[sub], text[sub], [keys[i] for i in sub])
    assert _same(alone, {k: v[sub] for k, v in out.items()})
    # a different company: reversed order, mixed with unseen pairs, tiny batches
    other_img, other_txt = _toy(seed=5)
    mix_img = np.concatenate([other_img[:30], image[sub[::-1]]])
    mix_txt = np.concatenate([other_txt[:30], text[sub[::-1]]])
    mix_keys = [f"new{i}" for i in range(30)] + [keys[i] for i in sub[::-1]]
    mixed = model.score(mix_img, mix_txt, mix_keys, batch_size=7)
    assert _same({k: v[30:] for k, v in mixed.items()}, {k: v[sub[::-1]] for k, v in out.items()})


def test_checkpoint_round_trip(fitted, tmp_path):
    image, text, keys, model, out = fitted
    model.save(tmp_path / "ckpt")
    loaded = BiCroModel.load(tmp_path / "ckpt")
    assert loaded.anchor_keys == model.anchor_keys
    assert _same(loaded.score(image, text, keys), out)
    unseen_img, unseen_txt = _toy(seed=9)
    assert _same(loaded.score(unseen_img, unseen_txt), model.score(unseen_img, unseen_txt))


def test_seed_determinism(fitted):
    image, text, keys, _, out = fitted
    _, again = fit_bicro(image, text, PARAMS, keys=keys)
    assert _same(again, out)
    _, other = fit_bicro(image, text, BiCroParams(**{**PARAMS.model_dump(), "seed": 1}), keys=keys)
    assert not np.array_equal(other["match_score"], out["match_score"])


def test_rejects_bad_inputs():
    image, text = _toy(n_img=10)
    with pytest.raises(ValueError):
        fit_bicro(image, text[:-1], PARAMS)
    with pytest.raises(ValueError):
        fit_bicro(image, text, BiCroParams(division="kmeans"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; run on a GPU machine)")
def test_cuda_fit_is_deterministic_and_scores_on_cpu_after_load(fitted, tmp_path):
    image, text, keys, _, cpu_out = fitted
    model, a = fit_bicro(image, text, PARAMS, keys=keys, device="cuda")
    _, b = fit_bicro(image, text, PARAMS, keys=keys, device="cuda")
    assert _same(a, b)
    assert next(model.nets[0].parameters()).device.type == "cuda"
    # the same recipe on another device: float order differs, the learned scores must still agree closely
    assert np.corrcoef(a["match_score"], cpu_out["match_score"])[0, 1] > 0.95
    # a CUDA-trained checkpoint scores on a CPU-only worker like on the GPU
    model.save(tmp_path / "ckpt")
    on_cpu = BiCroModel.load(tmp_path / "ckpt", device="cpu").score(image, text, keys)
    np.testing.assert_allclose(on_cpu["match_score"], a["match_score"], atol=1e-4)
    np.testing.assert_allclose(on_cpu["p_clean"], a["p_clean"], atol=1e-3)
