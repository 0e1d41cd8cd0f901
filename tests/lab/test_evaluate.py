import csv
import json

import numpy as np
import pytest
import torch

from bicro_clean.lab import evaluate as evaluate_module
from bicro_clean.lab.evaluate import (Benchmark, detection, detection_by_kind, load_benchmark, pair_cosine,
                                      results_table, retrieval, run_methods)
from bicro_clean.models.baselines import ncr_predict
from bicro_clean.models.losses import default_negatives
from bicro_clean.models.matcher import Matcher
from bicro_clean.models.params import BiCroParams


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
    got = detection(clean, {"soft_label": soft, "p_clean": soft})
    # keep = [1, 1, 0, 1, 0]: tp 2, kept 3, clean 3
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3)
    assert got["est_noise_rate"] == pytest.approx(0.4)
    assert got["auroc_soft_label"] == pytest.approx(5 / 6)
    none = detection(clean, {"soft_label": None, "p_clean": None})
    assert all(v is None for v in none.values())
    assert got["auroc_p_clean"] == got["auroc_soft_label"] and got["auroc_clean_score"] is None


def test_ncr_predict_is_scaled_confidence():
    sims = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.4], [0.1, 0.0, 0.8]])
    p = ncr_predict(sims, default_negatives(3), alpha=0.2)
    # pairs 0 and 2 have no hinge: p = alpha = 0.2. Pair 1: image term [0.1, 0.3] mean 0.2, caption term
    # [0, 0] mean 0 -> p = 0.2 - (0.2 + 0) / 2 = 0.1. Scaled by the mean of the top 3 // 10 + 1 = 1 value (0.2).
    assert p.tolist() == pytest.approx([1.0, 0.5, 1.0])


# ------------------------------------------------------------------------------- noise kinds, cosine, per kind


def test_detection_by_kind_compares_clean_with_each_kind():
    kind = np.array(["clean", "clean", "shuffle", "shuffle", "alt-text"])
    score = np.array([0.9, 0.5, 0.1, 0.7, 0.8])
    got = detection_by_kind(kind, {"cosine": score, "p_clean": None})
    assert set(got) == {"shuffle", "alt-text"}  # kinds present only; no near-miss pair
    # shuffle: clean {0.9, 0.5} vs {0.1, 0.7}: 3 of 4 ordered right; alt-text: {0.9, 0.5} vs {0.8}: 1 of 2
    assert got["shuffle"] == {"auroc_cosine": pytest.approx(0.75)}
    assert got["alt-text"] == {"auroc_cosine": pytest.approx(0.5)}
    overall = detection(kind == "clean", {"cosine": score})
    assert overall["auroc_cosine"] == pytest.approx(4 / 6) and overall["precision"] is None


def _synthetic_benchmark(seed: int = 0, photos: int = 60, per: int = 4) -> Benchmark:
    """Frozen 'embeddings' of photos and captions sharing a latent, with each noise kind injected by hand."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(photos + 20, 16))
    mix_i, mix_t = rng.normal(size=(16, 24)), rng.normal(size=(16, 12))
    image_emb = (latent @ mix_i + 0.1 * rng.normal(size=(photos + 20, 24))).astype(np.float32)
    caption_image = np.repeat(np.arange(photos + 20), per)
    text_emb = (latent[caption_image] @ mix_t + 0.3 * rng.normal(size=(len(caption_image), 12))).astype(np.float32)
    train = caption_image < photos
    n = int(train.sum())
    kind = np.array(["clean"] * n, dtype=object)
    order = rng.permutation(n)
    kind[order[:30]], kind[order[30:60]], kind[order[60:80]] = "shuffle", "near-miss", "alt-text"
    image = caption_image[:n].copy()
    image[kind == "shuffle"] = (image[kind == "shuffle"] + 7) % photos
    text = text_emb[:n].copy()
    near = np.flatnonzero(kind == "near-miss")
    text[near] = text_emb[(near + per * 3) % n]  # a caption of another photo
    boiler = rng.normal(size=12)  # alt-text: one shared direction, nothing of the photo
    text[kind == "alt-text"] = (boiler + 0.3 * rng.normal(size=(20, 12))).astype(np.float32)
    return Benchmark(train_image=image_emb[image], train_text=text, clean=kind == "clean",
                     test_image=image_emb[photos:], test_text=text_emb[~train],
                     test_caption_image=caption_image[~train] - photos, kind=kind.astype(str))


def test_cosine_reuses_vanilla_and_every_method_reports_per_kind(monkeypatch):
    bench = _synthetic_benchmark()
    fits = []
    real_fit_plain = evaluate_module.fit_plain
    monkeypatch.setattr(evaluate_module, "fit_plain", lambda *a, **k: fits.append(1) or real_fit_plain(*a, **k))
    params = BiCroParams(epochs=6, batch_size=32, embed_dim=16, hidden_dim=0, bank_size=32, top_anchors=8,
                         threads=1, seed=0, lr=3e-3)
    rates = {"shuffle": 0.125, "near-miss": 0.125, "alt-text": 20 / 240}
    res = run_methods(bench, rates, 0, ["vanilla", "cosine", "ncr"], None, params, "cpu")
    assert len(fits) == 1  # cosine reused vanilla's matchers
    assert res["noise_kind"] == "mix"
    assert res["noise_counts"] == {"clean": 160, "shuffle": 30, "near-miss": 30, "alt-text": 20}
    vanilla, cosine, ncr = (res["methods"][m] for m in ("vanilla", "cosine", "ncr"))
    assert cosine["reuses"] == "vanilla" and cosine["rsum"] == vanilla["rsum"]
    assert vanilla["score"] is None and vanilla["by_kind"] == {} and vanilla["auroc_cosine"] is None
    assert cosine["score"] == "cosine" and set(cosine["by_kind"]) == {"shuffle", "near-miss", "alt-text"}
    assert cosine["auroc_cosine"] > 0.8  # the matcher learnt the latent: mismatched pairs have low cosine
    assert all(v["auroc_cosine"] > 0.7 for v in cosine["by_kind"].values())
    assert ncr["score"] == "p_clean" and set(ncr["by_kind"]["near-miss"]) == {"auroc_soft_label", "auroc_p_clean"}
    table = results_table([res])
    header = table.splitlines()[0]
    for column in ("AUROC clean_score", "AUROC cosine", "AUROC shuffle", "AUROC near-miss", "AUROC alt-text"):
        assert column in header
    assert "| mix 0.333 | cosine |" in table and len({line.count("|") for line in table.splitlines()}) == 1


def test_pair_cosine_is_the_mean_of_the_nets_cosines():
    torch.manual_seed(0)
    nets = [Matcher(6, 5, 4, 0), Matcher(6, 5, 4, 0)]
    image = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)
    text = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32)
    got = pair_cosine(nets, image, text, "cpu")
    with torch.no_grad():
        want = np.mean([torch.diagonal(net(torch.from_numpy(image), torch.from_numpy(text))).numpy() for net in nets],
                       axis=0)
    assert got == pytest.approx(want, abs=1e-6)


def test_results_table_reads_results_from_before_noise_kinds():
    entry = {"auroc_soft_label": 0.9, "auroc_p_clean": 0.8, "est_noise_rate": 0.4, "precision": 0.9, "recall": 0.8,
             "i2t": [1.0, 2.0, 3.0], "t2i": [1.0, 2.0, 3.0], "rsum": 12.0, "seconds": 5, "cpu_seconds": 9}
    table = results_table([{"noise_rate": 0.4, "seed": 0, "methods": {"bicro": entry}}])
    assert "AUROC shuffle" not in table and "AUROC cosine" not in table
    assert "| shuffle 0.4 | bicro | 0.900 | 0.800 |  | 0.400 | 0.900 / 0.800 |" in table


def test_load_benchmark_substitutes_the_caption_embeddings(tmp_path, monkeypatch):
    """near-miss pairs carry the donor caption's cached embedding, alt-text pairs their generated strings'."""
    photos, per = 12, 5
    names = [f"p{i:02d}.jpg" for i in range(photos)]
    rows = [(names[p], f"a {['dog', 'cat', 'bird'][p % 3]} number {p} caption {c}") for p in range(photos)
            for c in range(per)]
    with open(tmp_path / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    (tmp_path / "splits.json").write_text(json.dumps({"train": names[:10], "test": names[10:]}))
    image_emb = np.arange(photos, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    text_emb = np.arange(photos * per, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    embedded: list[list[str]] = []
    monkeypatch.setattr(evaluate_module, "cached_embeddings",
                        lambda *a, **k: {"image_emb": image_emb, "text_emb": text_emb})
    monkeypatch.setattr(evaluate_module, "cached_text_embeddings",
                        lambda texts, *a, **k: embedded.append(texts) or np.full((len(texts), 2), -1, np.float32))
    bench = load_benchmark(tmp_path, {"near-miss": 0.2, "alt-text": 0.2}, 3, tmp_path / "cache")
    kind = bench.kinds()
    assert {k: int(np.sum(kind == k)) for k in ("clean", "near-miss", "alt-text")} == {
        "clean": 30, "near-miss": 10, "alt-text": 10}
    own_caption = np.arange(50)  # the train captions are the first 50 rows (sorted names, 5 each)
    assert np.array_equal(bench.train_image[:, 0], own_caption // per)  # images never move for these kinds
    clean, near, alt = kind == "clean", kind == "near-miss", kind == "alt-text"
    assert np.array_equal(bench.train_text[clean, 0], own_caption[clean])
    donors = bench.train_text[near, 0].astype(int)
    assert np.all(donors // per != own_caption[near] // per) and np.all(donors < 50)  # another train photo
    assert np.all(bench.train_text[alt] == -1) and len(embedded) == 1 and len(embedded[0]) == 10
    assert bench.test_text.shape == (10, 2) and bench.test_caption_image.tolist() == [0] * 5 + [1] * 5
    shuffled = load_benchmark(tmp_path, 0.4, 3, tmp_path / "cache")  # a plain rate: shuffle, the old protocol
    assert set(shuffled.kinds()) == {"clean", "shuffle"} and shuffled.clean.sum() == 30


def test_bicro_reports_clean_score_when_the_model_has_it(monkeypatch):
    bench = _synthetic_benchmark()
    n = len(bench.clean)
    nets = [Matcher(24, 12, 8, 0), Matcher(24, 12, 8, 0)]
    mixture = type("Mixture", (), {"noisy_weight": lambda self: 0.3})()
    model = type("Model", (), {"nets": nets, "mixtures": [mixture, mixture]})()
    truth = bench.clean.astype(np.float32)
    outputs = {"soft_label": 0.5 + 0.1 * truth, "p_clean": np.full(n, 0.5, np.float32), "clean_score": truth}
    monkeypatch.setattr(evaluate_module, "fit_bicro", lambda *a, **k: (model, outputs))
    params = BiCroParams(threads=1)
    entry = run_methods(bench, {"shuffle": 0.4}, 0, ["bicro"], None, params, "cpu")["methods"]["bicro"]
    assert entry["score"] == "clean_score" and entry["auroc_clean_score"] == 1.0 and entry["auroc_p_clean"] == 0.5
    assert entry["by_kind"]["alt-text"]["auroc_clean_score"] == 1.0
    del outputs["clean_score"]  # a model without it: p_clean is the per-kind score
    entry = run_methods(bench, {"shuffle": 0.4}, 0, ["bicro"], None, params, "cpu")["methods"]["bicro"]
    assert entry["score"] == "p_clean" and entry["auroc_clean_score"] is None
    assert entry["est_noise_rate_mixture"] == pytest.approx(0.3)


def test_text_embeddings_are_cached_per_set_of_strings(tmp_path, monkeypatch):
    from bicro_clean.lab import flickr8k

    first = flickr8k.cached_text_embeddings(["IMG_0042.JPG", "Buy now"], tmp_path, "tiny", "cpu")
    assert first.shape[0] == 2 and len(list(tmp_path.glob("texts-tiny-*.npy"))) == 1
    monkeypatch.setattr(flickr8k, "_embed_texts", lambda *a: pytest.fail("a cached set was embedded again"))
    assert np.array_equal(flickr8k.cached_text_embeddings(["IMG_0042.JPG", "Buy now"], tmp_path, "tiny", "cpu"), first)
    monkeypatch.undo()
    flickr8k.cached_text_embeddings(["Buy now", "IMG_0042.JPG"], tmp_path, "tiny", "cpu")
    assert len(list(tmp_path.glob("texts-tiny-*.npy"))) == 2  # other strings (or order): another entry
