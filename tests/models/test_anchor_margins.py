"""Anchor margins (models/margins.py): the two optional clean_score evidence columns, end to end."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from bicro_clean.models.anchors import AnchorIndex
from bicro_clean.models.bicro import BiCroModel
from bicro_clean.models.clean_score import evidence_matrix
from bicro_clean.models.margins import NO_ANCHOR_COSINE, anchor_margins, resolve_anchor_margins
from bicro_clean.models.train import fit_bicro
from bicro_clean.pipeline.score import _batch_table, score_batch
from tests.models.test_bicro import ANCHOR_IMG, ANCHOR_TXT, PARAMS, _same, _t, _toy

MARGINS = ("margin_i2t", "margin_t2i")


def test_margins_hand_computed_with_self_exclusion():
    img = _t([[0.8, 0.6], [0.6, 0.8], [0.8, -0.6]])
    txt = _t([[0.6, 0.8], [0.8, 0.6], [1.0, 0.0]])
    own = np.array([-1, 1, -1])  # pair 1 IS anchor 1
    # pair 0: cos 0.96; image vs anchor captions (0.8, 1.0, 0.96) -> 1.0; caption vs anchor images
    #         (0.6, 1.0, -0.6) -> 1.0
    # pair 1: cos 0.96; image vs captions without its own row 1 (0.6, -, 1.0) -> 1.0; caption vs images without
    #         row 1 (0.8, -, -0.8) -> 0.8 (row 1, 0.96, would have given 0.0)
    # pair 2: cos 0.8; image vs captions (0.8, 0.28, 0.0) -> 0.8; caption vs images (1.0, 0.6, -1.0) -> 1.0
    want_i2t, want_t2i = [-0.04, -0.04, 0.0], [-0.04, 0.16, -0.2]
    m_i2t, m_t2i = anchor_margins(img, txt, ANCHOR_IMG, ANCHOR_TXT, own, None, None, chunk=4)
    assert torch.allclose(m_i2t, _t(want_i2t), atol=1e-6) and torch.allclose(m_t2i, _t(want_t2i), atol=1e-6)
    # the prepared indexes scoring reuses give the same answers (the caption index answers image queries)
    indexes = (AnchorIndex.build(ANCHOR_IMG), AnchorIndex.build(ANCHOR_TXT))
    p_i2t, p_t2i = anchor_margins(img, txt, ANCHOR_IMG, ANCHOR_TXT, own, indexes, None, chunk=4)
    assert torch.equal(p_i2t, m_i2t) and torch.equal(p_t2i, m_t2i)
    _, without_exclusion = anchor_margins(img, txt, ANCHOR_IMG, ANCHOR_TXT, np.full(3, -1), None, None, chunk=4)
    assert without_exclusion[1].item() == pytest.approx(0.0, abs=1e-6)


def test_no_anchor_left_compares_with_the_lowest_cosine():
    img, txt = ANCHOR_IMG[:1], ANCHOR_TXT[:1]  # the bank's only row is the pair itself
    m_i2t, m_t2i = anchor_margins(img, txt, ANCHOR_IMG[:1], ANCHOR_TXT[:1], np.array([0]), None, None, chunk=4)
    assert m_i2t.item() == pytest.approx(1.0 - NO_ANCHOR_COSINE) and m_t2i.item() == pytest.approx(1.0 - NO_ANCHOR_COSINE)
    empty = torch.zeros(0, 2)
    m_i2t, _ = anchor_margins(img, txt, empty, empty, np.array([-1]), None, None, chunk=4)
    assert m_i2t.item() == pytest.approx(1.0 - NO_ANCHOR_COSINE)


def test_auto_resolves_by_the_fit_device():
    assert resolve_anchor_margins("auto", "cuda") == "on"
    assert resolve_anchor_margins("auto", "cpu") == "off"
    assert resolve_anchor_margins("on", "cpu") == "on" and resolve_anchor_margins("off", "cuda") == "off"
    with pytest.raises(ValueError, match="auto, on, off"):
        resolve_anchor_margins("yes", "cpu")


@pytest.fixture(scope="module")
def fitted_on():
    image, text = _toy()
    keys = [f"k{i}" for i in range(len(image))]
    model, out = fit_bicro(image, text, PARAMS.model_copy(update={"anchor_margins": "on"}), keys=keys)
    return image, text, keys, model, out


def _exact_margins(model: BiCroModel, image: np.ndarray, text: np.ndarray, keys: list[str]) -> np.ndarray:
    """Brute force over every anchor row (as lab.evidence_ceiling measured them)."""
    with torch.no_grad():
        ci, ct = model.consistency_embeddings([n.embed_images(torch.from_numpy(image)) for n in model.nets],
                                              [n.embed_texts(torch.from_numpy(text)) for n in model.nets])
    pos = (ci * ct).sum(1)
    vs_captions, vs_images = ci @ model.anchor_txt.T, ct @ model.anchor_img.T
    rows = {k: i for i, k in enumerate(model.anchor_keys)}
    for n, key in enumerate(keys):
        if key in rows:
            vs_captions[n, rows[key]] = vs_images[n, rows[key]] = -2.0
    return torch.stack([pos - vs_captions.max(1).values, pos - vs_images.max(1).values], 1).numpy()


def test_model_with_margins_outputs_and_weighs_them(fitted_on):
    image, text, keys, model, out = fitted_on
    assert model.params.anchor_margins == "on" and model.margins_on
    for name in MARGINS:
        assert out[name].dtype == np.float32 and out[name].shape == (len(image),)
    np.testing.assert_allclose(np.column_stack([out[m] for m in MARGINS]), _exact_margins(model, image, text, keys),
                               atol=1e-5)
    assert len(model.clean_scorer.weights) == 7 and evidence_matrix(out).shape == (len(image), 7)
    assert np.array_equal(out["clean_score"], model.clean_scorer(evidence_matrix(out)))


def test_margins_independent_of_batch_composition(fitted_on):
    image, text, keys, model, out = fitted_on
    sub = np.array([5, 17, 3, 200, 64])
    other_img, other_txt = _toy(seed=5)
    mix_img = np.concatenate([other_img[:30], image[sub[::-1]]])
    mix_txt = np.concatenate([other_txt[:30], text[sub[::-1]]])
    mix_keys = [f"new{i}" for i in range(30)] + [keys[i] for i in sub[::-1]]
    mixed = model.score(mix_img, mix_txt, mix_keys, batch_size=7)
    assert _same({k: v[30:] for k, v in mixed.items()}, {k: v[sub[::-1]] for k, v in out.items()})
    assert set(MARGINS) <= mixed.keys()
    assert set(MARGINS) <= model.score(image[:0], text[:0]).keys()


def test_checkpoint_round_trip_keeps_the_fit_choice(fitted_on, tmp_path):
    image, text, keys, model, out = fitted_on
    model.save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "model.json").read_text())["params"]["anchor_margins"] == "on"
    loaded = BiCroModel.load(tmp_path / "ckpt")
    assert loaded.margins_on and _same(loaded.score(image, text, keys), out)
    # a model.json that contradicts the stored clean_score is refused with one line, not mis-scored
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    meta["params"]["anchor_margins"] = "off"
    (tmp_path / "ckpt" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="7 evidence weights"):
        BiCroModel.load(tmp_path / "ckpt")


def test_cpu_auto_fit_is_off_and_an_old_five_column_checkpoint_still_loads(tmp_path):
    image, text = _toy(n_img=30)
    model, out = fit_bicro(image, text, PARAMS)  # anchor_margins "auto", fitted on the CPU
    assert model.params.anchor_margins == "off" and not set(MARGINS) & out.keys()
    assert len(model.clean_scorer.weights) == 5
    model.save(tmp_path / "ckpt")
    # the checkpoint as written before anchor margins existed: format 2, no anchor_margins in its params
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    del meta["params"]["anchor_margins"]
    (tmp_path / "ckpt" / "model.json").write_text(json.dumps(meta | {"format_version": 2}))
    old = BiCroModel.load(tmp_path / "ckpt")
    assert not old.margins_on and _same(old.score(image, text), model.score(image, text))


def test_pipeline_scores_carry_the_margins(fitted_on):
    image, text, keys, model, out = fitted_on
    rows = 6
    emb = [pa.FixedSizeListArray.from_arrays(pa.array(x[:rows].reshape(-1)), x.shape[1]) for x in (image, text)]
    batch = pa.RecordBatch.from_pydict({
        "shard": ["s.tar"] * rows, "key": keys[:rows], "status": ["ok"] * (rows - 1) + ["decode_error"],
        "image_emb": emb[0], "text_emb": emb[1]})
    table = _batch_table_for(batch, score_batch(model, batch, aligned=False))
    got = table["margin_i2t"].to_pylist()
    assert got[-1] is None and all(v is not None for v in got[:-1])
    assert table.schema.field("margin_t2i").type == pa.float32()


def _batch_table_for(batch: pa.RecordBatch, scores: dict) -> pa.Table:
    """pipeline.score._batch_table wants the reader's base columns: fill the ones this batch lacks with nulls."""
    from bicro_clean.pipeline.score import BASE_COLUMNS

    columns = {name: batch.column(name) if name in batch.schema.names else pa.nulls(batch.num_rows, pa.string())
               for name in BASE_COLUMNS}
    full = pa.RecordBatch.from_pydict(columns)
    return _batch_table(full, scores)
