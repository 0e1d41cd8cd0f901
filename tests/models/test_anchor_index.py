"""Anchor search options: the IVF index keeps scoring independent of batch composition and deterministic, and
the scoring state is built once per model and dropped when the anchor bank changes."""

from __future__ import annotations

import numpy as np
import torch

from bicro_clean.models.anchors import AnchorIndex, auto_nlist, nearest_anchor
from bicro_clean.models.params import BiCroParams
from bicro_clean.models.train import fit_bicro


def _pairs(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))
    image = z @ rng.normal(size=(8, 24)) + 0.1 * rng.normal(size=(n, 24))
    text = z @ rng.normal(size=(8, 16)) + 0.3 * rng.normal(size=(n, 16))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image.astype(np.float32), text.astype(np.float32)


PARAMS = BiCroParams(epochs=2, warmup_epochs=1, batch_size=32, embed_dim=16, hidden_dim=32, bank_size=48,
                     lr=1e-3, top_anchors=20, threads=1, anchor_index="ivf", ivf_nprobe=2)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32))
    return torch.nn.functional.normalize(x, dim=1)


def test_ivf_index_is_deterministic_and_close_to_exact():
    bank, queries = _unit(2000, 32, 1), _unit(300, 32, 2)
    own = np.full(300, -1, dtype=np.int64)
    exact = nearest_anchor(queries, bank, own)
    first = AnchorIndex.build(bank, "ivf", nprobe=8, seed=3)
    second = AnchorIndex.build(bank, "ivf", nprobe=8, seed=3)
    assert first.kind == "ivf" and first.index.nlist == auto_nlist(2000)
    a = nearest_anchor(queries, bank, own, first)
    assert np.array_equal(a, nearest_anchor(queries, bank, own, second))
    assert np.mean(a == exact) > 0.6  # 8 of 89 lists on random (worst-case, unclustered) data: 0.76 seen
    full = AnchorIndex.build(bank, "ivf", nlist=auto_nlist(2000), nprobe=10_000, seed=3)
    assert np.array_equal(nearest_anchor(queries, bank, own, full), exact)  # every list visited: exact


def test_small_banks_fall_back_to_exact_search():
    assert AnchorIndex.build(_unit(100, 8, 0), "ivf").kind == "flat"


def test_ivf_scores_do_not_depend_on_batch_composition():
    image, text = _pairs()
    keys = [f"k{i}" for i in range(len(image))]
    model, out = fit_bicro(image, text, PARAMS, keys=keys)
    assert model.scoring_state().indexes[1].kind == "ivf"
    sub = np.array([7, 3, 250, 99])
    alone = model.score(image[sub], text[sub], [keys[i] for i in sub], batch_size=3)
    for name, values in alone.items():
        assert np.array_equal(values, out[name][sub]), name


def test_scoring_state_built_once_and_reset_with_the_anchor_bank():
    image, text = _pairs(seed=1)
    model, _ = fit_bicro(image, text, PARAMS.model_copy(update={"anchor_index": "flat"}))
    state = model.scoring_state()
    model.score(image[:5], text[:5])
    assert model.scoring_state() is state
    model.anchor_img = model.anchor_img[:50].contiguous()
    model.anchor_txt = model.anchor_txt[:50].contiguous()
    model.anchor_keys = model.anchor_keys[:50]
    assert model.scoring_state() is not state
    out = model.score(image[:5], text[:5])
    assert out["anchor_for_image"].max() < 50 and out["anchor_for_text"].max() < 50


def test_auto_search_is_exact_for_small_banks_and_ivf_above_the_threshold(monkeypatch):
    import bicro_clean.models.anchors as anchors

    bank = _unit(2000, 32, 4)
    assert AnchorIndex.build(bank, "auto").kind == "flat"  # 2,000 rows <= AUTO_IVF_MIN_ROWS
    monkeypatch.setattr(anchors, "AUTO_IVF_MIN_ROWS", 1000)
    assert AnchorIndex.build(bank, "auto").kind == "ivf"
    assert AnchorIndex.build(bank, "auto", exact="torch").kind == "flat"  # exact torch search on a GPU
    assert AnchorIndex.build(bank, "flat").kind == "flat"


def test_training_uses_the_auto_index_above_the_threshold(monkeypatch):
    """Training's consistency labels go through the same auto choice as scoring, so a large anchor bank is
    searched with IVF in every epoch (the cost per pair stays bounded: fit time linear in pairs)."""
    import bicro_clean.models.anchors as anchors

    built: list[str] = []
    original = anchors.AnchorIndex.build.__func__

    def spy(cls, bank, kind="flat", *args, **kwargs):
        index = original(cls, bank, kind, *args, **kwargs)
        built.append(index.kind)
        return index

    monkeypatch.setattr(anchors, "AUTO_IVF_MIN_ROWS", 150)
    monkeypatch.setattr(anchors.AnchorIndex, "build", classmethod(spy))
    image, text = _pairs(seed=2)
    fit_bicro(image, text, PARAMS.model_copy(update={"anchor_index": "auto"}))
    assert "ivf" in built  # banks of > 150 distinct rows (the clean set of 400 pairs) in training


def test_default_anchor_bank_is_bounded():
    from bicro_clean.pipeline.config import BiCroConfig

    assert BiCroParams().anchor_top_k == BiCroConfig().anchor_top_k == 65_536
    assert BiCroParams().anchor_index == BiCroConfig().anchor_index == "auto"
