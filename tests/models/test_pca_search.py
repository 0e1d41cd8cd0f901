"""The "pca" anchor search (candidates from a PCA projection, re-ranked exactly): the default on the CPU for
mid-sized banks, in scoring and training. It must stay deterministic and batch-independent and agree with exact
search, with flat or IVF candidates; and the scoring batch sizes follow the device."""

from __future__ import annotations

import numpy as np
import torch

import bicro_clean.models.anchors as anchors
from bicro_clean.models.anchors import AnchorIndex, nearest_anchor, search_kind
from bicro_clean.models.bicro import SCORE_BATCH_CPU, SCORE_CHUNK_CPU, score_sizes
from bicro_clean.models.params import BiCroParams
from bicro_clean.models.train import fit_bicro
from bicro_clean.pipeline.score import BATCH_ROWS, batch_rows_for


def _clustered(n: int, d: int, seed: int, rank: int = 12) -> torch.Tensor:
    """Unit rows with most of their energy in `rank` shared directions (like a trained embedding space)."""
    basis = np.random.default_rng(0).normal(size=(rank, d))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, rank)) @ basis + 0.15 * rng.normal(size=(n, d))
    return torch.nn.functional.normalize(torch.from_numpy(x.astype(np.float32)), dim=1)


def test_auto_picks_pca_on_the_cpu_for_scoring_and_training(monkeypatch):
    assert search_kind("auto", 10_000, 1024, "faiss", scoring=True) == "pca"
    assert search_kind("auto", 10_000, 1024, "faiss") == "pca"  # training's labels: the same search
    assert search_kind("auto", 10_000, 512, "torch") == "flat"  # training on CUDA: exact torch search
    assert search_kind("auto", 10_000, 1024, "torch", scoring=True) == "flat"  # CUDA: exact torch search
    assert search_kind("auto", 1_000, 1024, "faiss", scoring=True) == "flat"  # small bank: exact is cheap
    assert search_kind("auto", 10_000, 128, "faiss", scoring=True) == "flat"  # narrow space: nothing to save
    assert search_kind("auto", 40_000, 1024, "faiss", scoring=True) == "ivf"
    assert search_kind("flat", 10_000, 1024, "faiss", scoring=True) == "flat"
    assert search_kind("pca", 10_000, 1024, "faiss") == "pca"


def test_auto_keeps_exact_search_where_the_projection_holds_little_energy(monkeypatch):
    monkeypatch.setattr(anchors, "PCA_DIM", 8)
    monkeypatch.setattr(anchors, "AUTO_PCA_MIN_ROWS", 100)
    isotropic = torch.nn.functional.normalize(torch.randn(1000, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    assert AnchorIndex.build(isotropic, "auto", scoring=True).kind == "flat"  # top 8 of 64 dims: ~20 %
    assert AnchorIndex.build(_clustered(1000, 64, 1, rank=6), "auto", scoring=True).kind == "pca"
    assert AnchorIndex.build(isotropic, "pca").kind == "pca"  # asked for explicitly: always


def test_pca_search_is_deterministic_batch_independent_and_close_to_exact(monkeypatch):
    monkeypatch.setattr(anchors, "PCA_DIM", 16)
    monkeypatch.setattr(anchors, "PCA_CANDIDATES", 8)
    bank = _clustered(1500, 64, 1)
    queries = torch.cat([bank[:40], _clustered(260, 64, 2)])
    own = np.full(300, -1, dtype=np.int64)
    own[:40] = np.arange(40)  # the first 40 queries are anchors themselves (self-exclusion)
    exact = nearest_anchor(queries, bank, own)
    index = AnchorIndex.build(bank, "pca")
    assert index.kind == "pca" and index.proj.shape == (64, 16)
    found = nearest_anchor(queries, bank, own, index, chunk=64)
    assert np.array_equal(found, nearest_anchor(queries, bank, own, AnchorIndex.build(bank, "pca"), chunk=64))
    assert np.mean(found == exact) > 0.95
    assert np.all(found[:40] != np.arange(40)) and np.all(found >= 0)  # never self
    alone = np.concatenate([nearest_anchor(queries[i : i + 1], bank, own[i : i + 1], index, chunk=64)
                            for i in (0, 17, 299)])
    assert np.array_equal(alone, found[[0, 17, 299]])


def test_pca_scores_do_not_depend_on_batch_composition(monkeypatch):
    """The fitted model's score() with the pca search (forced on a tiny space): bit for bit per pair."""
    monkeypatch.setattr(anchors, "PCA_DIM", 4)
    monkeypatch.setattr(anchors, "PCA_CANDIDATES", 6)
    monkeypatch.setattr(anchors, "AUTO_PCA_MIN_ROWS", 50)
    monkeypatch.setattr(anchors, "PCA_MIN_ENERGY", 0.0)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 8))
    image = (z @ rng.normal(size=(8, 24)) + 0.1 * rng.normal(size=(400, 24))).astype(np.float32)
    text = (z @ rng.normal(size=(8, 16)) + 0.3 * rng.normal(size=(400, 16))).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    keys = [f"k{i}" for i in range(400)]
    params = BiCroParams(epochs=2, warmup_epochs=1, batch_size=32, embed_dim=16, hidden_dim=32, bank_size=48,
                         lr=1e-3, top_anchors=20, threads=1)
    model, out = fit_bicro(image, text, params, keys=keys)
    assert model.scoring_state().indexes[1].kind == "pca"
    sub = np.array([7, 3, 250, 99])
    alone = model.score(image[sub], text[sub], [keys[i] for i in sub], batch_size=3)
    for name, values in alone.items():
        assert np.array_equal(values, out[name][sub]), name


def test_scoring_batches_follow_the_device():
    chunk_cuda, batch_cuda = score_sizes("cuda")
    assert score_sizes("cpu") == (SCORE_CHUNK_CPU, SCORE_BATCH_CPU) == (1024, 4096)  # CPU results unchanged
    assert chunk_cuda > SCORE_CHUNK_CPU and batch_cuda > SCORE_BATCH_CPU and batch_cuda % chunk_cuda == 0

    class Model:
        score_batch_rows = batch_cuda

    assert batch_rows_for(Model()) == batch_cuda
    assert batch_rows_for(object()) == BATCH_ROWS == SCORE_BATCH_CPU


def _exact_top1(bank: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    return torch.argmax(queries @ bank.T, dim=1).numpy()


def test_pca_ivf_candidates_agree_with_exact_and_are_deterministic(monkeypatch):
    """From PCA_IVF_MIN_ROWS rows the candidates come from an IVF index over the projected rows: the answers stay
    (nearly) the exact ones, identical between builds and whatever the other queries in the call."""
    monkeypatch.setattr(anchors, "PCA_DIM", 16)
    monkeypatch.setattr(anchors, "PCA_CANDIDATES", 16)
    monkeypatch.setattr(anchors, "PCA_IVF_MIN_ROWS", 1000)
    monkeypatch.setattr(anchors, "PCA_IVF_NPROBE", 8)
    bank = _clustered(3000, 64, 1, rank=8)
    queries = torch.cat([bank[:50], _clustered(450, 64, 2, rank=8)])
    own = np.full(500, -1, dtype=np.int64)
    own[:50] = np.arange(50)
    index = AnchorIndex.build(bank, "pca", seed=3)
    assert index.kind == "pca" and index.index.__class__.__name__ == "IndexIVFFlat"
    exact = nearest_anchor(queries, bank, own)
    found = nearest_anchor(queries, bank, own, index, chunk=64)
    again = nearest_anchor(queries, bank, own, AnchorIndex.build(bank, "pca", seed=3), chunk=64)
    assert np.array_equal(found, again)  # seeded k-means: same index, same answers
    assert np.mean(found == exact) > 0.97
    assert np.all(found[:50] != np.arange(50)) and np.all(found >= 0)  # never self, always an anchor
    same = found[50:] == exact[50:]
    assert np.array_equal(found[50:][same], _exact_top1(bank, queries[50:])[same])
    alone = np.concatenate([nearest_anchor(queries[i : i + 1], bank, own[i : i + 1], index, chunk=64)
                            for i in (0, 77, 499)])
    assert np.array_equal(alone, found[[0, 77, 499]])


def test_ivf_candidates_short_of_k_never_pick_a_wrong_row():
    """An IVF candidate search may return -1 ids (too few rows in the visited lists): never taken as an anchor."""
    bank = _clustered(300, 32, 1)
    index = AnchorIndex.build(bank, "flat")
    hits = np.array([[-1, -1], [5, -1], [-1, 7]], dtype=np.int64)
    best = index.best(hits, np.full(3, -1, dtype=np.int64))
    assert best[0] == -1 and best[1] == index.rep1[5] and best[2] == index.rep1[7]
