"""lab.anchor_margins on a toy crawl: the off / on comparison, the agreement with exact search and the timing."""

import numpy as np

from bicro_clean.lab import anchor_margins as lab
from tests.models.test_bicro import PARAMS, _toy


def test_margins_lab_compares_off_and_on_from_one_fit():
    image, text = _toy(n_img=100)
    params = PARAMS.model_copy(update={"anchor_margins": "on", "calibration_folds": 2})
    model, outputs, seen = lab.fit_recording(image, text, params)
    assert {"full", "oof"} <= seen.keys() and seen["full"][0].shape == (len(image), 7)
    clean = np.random.default_rng(0).random(len(image)) < 0.6
    off, on, agreement = lab.quality(model, outputs, seen, image, text, clean, np.where(clean, "clean", "shuffle"))
    assert off["score"] == "clean_score_margins_off" and on["score"] == "clean_score_margins_on"
    assert agreement["index"] == "flat" and agreement["same_margin_i2t"] == agreement["same_margin_t2i"] == 1.0
    cost = lab.cost(model, lab.scorer_without_margins(seen), image, text, 200, 2, 0)
    assert cost["pairs"] == 200 and cost["on_cpu_s"] >= 0 and model.margins_on  # the model is left as fitted
