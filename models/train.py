"""BiCro training: the co-training loop that turns frozen pair embeddings into a fitted BiCroModel.

Each epoch every network divides the training pairs (models/cotrain.py), and the labels it derives from its
division (clean set, anchors, consistency soft labels: models/consistency.py) train its PEER. `finalise` picks
the anchor bank from both networks' final divisions and builds the scoring model (models/bicro.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from bicro_clean.models.anchors import AnchorIndex
from bicro_clean.models.bicro import BiCroModel
from bicro_clean.models.calibration import OutOfFold, can_cross_fit, cross_fitted, fold_of
from bicro_clean.models.clean_score import CleanScorer, evidence_matrix, evidence_width
from bicro_clean.models.consistency import (
    clean_set,
    consistency_labels,
    consistency_space,
    select_anchors,
    soft_labels,
    space_center,
    top_anchor_mask,
)
from bicro_clean.models.cotrain import CoTrainer, Division, NegativeBank, PairData, divide, seeded, torch_threads
from bicro_clean.models.matcher import Matcher
from bicro_clean.models.params import BiCroParams

logger = logging.getLogger(__name__)

REFERENCE_STREAM = 0x2EF0CE  # seeds the re-pairing of clean_score's reference set; no other draw uses it


@dataclass
class EpochLabels:
    labels: np.ndarray  # (N,) soft label for every pair
    clean: np.ndarray  # (N,) bool: the divider's clean set
    consistency: np.ndarray
    train_clean: np.ndarray  # (N,) bool: the clean-set pairs the peer actually trains on


QueryGroups = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def query_groups(data: PairData) -> QueryGroups:
    """Distinct (image, text) input rows as consistency_labels takes them: equal frozen inputs give equal
    embeddings, so the anchor search needs no hashing of each epoch's embeddings to find its distinct queries."""
    rows = (data.image_rows, data.text_rows)
    return tuple((first.cpu().numpy(), inverse.cpu().numpy()) for first, inverse in rows)  # type: ignore


def labels_from_division(
    div: Division, params: BiCroParams, consume: bool = False, groups: QueryGroups | None = None
) -> EpochLabels:
    """Everything one network hands its peer for an epoch: split, anchors and soft labels.

    `consume`: the division's embeddings may be overwritten (the caller drops them afterwards). `groups`: the
    distinct image / text rows of the pairs (query_groups), found from the embeddings when None."""
    clean = clean_set(div.p_clean, params.clean_threshold)
    anchors = select_anchors(div.p_clean, clean, params.anchor_top_k)
    own = np.full(len(clean), -1, dtype=np.int64)
    own[anchors] = np.arange(len(anchors))
    a = torch.from_numpy(anchors).to(div.img_emb.device)
    img = consistency_space(div.img_emb, space_center(div.img_emb, params.center_consistency), consume)
    txt = consistency_space(div.txt_emb, space_center(div.txt_emb, params.center_consistency), consume)
    # the run's anchor search ("auto": IVF once the bank is large; exact search over a large bank every epoch
    # would take hours at 1M pairs on a CPU)
    exact = "torch" if img.device.type == "cuda" else "faiss"
    indexes = tuple(AnchorIndex.build(x[a], params.anchor_index, params.ivf_nlist, params.ivf_nprobe, params.seed,
                                      exact) for x in (img, txt))
    c, *_ = consistency_labels(img, txt, img[a], txt[a], own, indexes, groups)
    c_np = c.double().cpu().numpy()
    top = top_anchor_mask(own, params.top_anchors)
    labels = soft_labels(div.p_clean, c_np, top, params.clean_threshold, params.noisy_label_threshold)
    labels[clean & ~(div.p_clean > params.clean_threshold)] = 1.0  # forced clean set: trust it as anchors
    # A clean-set pair whose own neighbourhood contradicts it (consistency near 0) is most likely a noisy pair
    # with a small loss; training on it, even with a small margin, is how noisy pairs get memorised.
    train_clean = clean & ((c_np > params.train_consistency_floor) | top | ~(div.p_clean > params.clean_threshold))
    return EpochLabels(labels, clean, c_np, train_clean)


def _log_epoch(epoch: int, params: BiCroParams, info: dict, t0: float) -> None:
    logger.debug("bicro epoch %d/%d %s (%.0fs)", epoch + 1, params.epochs, info, time.time() - t0)


def fit_bicro(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    params: BiCroParams,
    keys: list[str] | None = None,
    aligned: bool = False,
    device: str = "cpu",
    log_every: int = 1,
    on_epoch: Callable[[int, dict], None] | None = None,
    held_out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[BiCroModel, Mapping[str, np.ndarray]]:
    """Train BiCro on frozen pair embeddings; returns the model and its outputs for the training pairs.
    ``on_epoch(epoch, info)`` is called after each epoch of every model trained (progress display; ``info`` is the
    logged epoch dict): `fit_epochs` says how many. ``held_out``: (image, text) embeddings of pairs of the same
    crawl that are not among the training pairs; clean_score is then calibrated on them (models/calibration.py).

    keys default to the row numbers as strings (they identify anchors for self-exclusion in score()).
    """
    params.revalidate()
    n = len(image_emb)
    keys = [str(i) for i in range(n)] if keys is None else list(keys)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} pairs")
    if len(set(keys)) != n:
        raise ValueError("keys must be unique")
    t0 = time.time()
    with torch_threads(params.threads):
        model = train_model(image_emb, text_emb, params, keys, aligned, device, log_every, on_epoch)
        outputs = calibrate_clean_score(model, image_emb, text_emb, keys,
                                        lambda tr: train_model(image_emb[tr], text_emb[tr], params,
                                                               [keys[i] for i in tr], aligned, device, 0, on_epoch),
                                        held_out)
    logger.info("bicro fit done in %.0fs: %d anchors", time.time() - t0, len(model.anchor_keys))
    return model, outputs


def fit_epochs(params: BiCroParams, pairs: int, held_out: bool = False) -> int:
    """Epochs `fit_bicro` trains in all: the full model's, plus every fold model's when it cross-fits."""
    folds = params.calibration_folds
    return params.epochs * (1 + (folds if not held_out and can_cross_fit(pairs, folds) else 0))


def train_model(image_emb: np.ndarray, text_emb: np.ndarray, params: BiCroParams, keys: list[str], aligned: bool,
                device: str, log_every: int, on_epoch: Callable[[int, dict], None] | None) -> BiCroModel:
    """Co-training and the final state, without clean_score: the full model and each cross-fitting fold model."""
    t0 = time.time()
    with seeded(params.seed, device), torch_threads(params.threads):
        data = PairData.build(image_emb, text_emb, device)
        bank = NegativeBank.sample(data, params.bank_size, params.seed)
        trainer = CoTrainer(data, params.train_config(), params.seed, aligned, device)
        run_cotraining(trainer, data, bank, params, log_every, t0, on_epoch=on_epoch)
        return finalise(trainer, data, bank, params, keys, aligned, device)


def reference_pairing(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point: row i's caption meets image perm[i], never its own."""
    perm = np.random.default_rng((seed, REFERENCE_STREAM)).permutation(n)
    fixed = np.flatnonzero(perm == np.arange(n))
    if n > 1 and len(fixed):  # rotate the fixed points among themselves (or swap a lone one with its neighbour)
        if len(fixed) > 1:
            perm[fixed] = perm[np.roll(fixed, 1)]
        else:
            other = (fixed[0] + 1) % n
            perm[fixed[0]], perm[other] = perm[other], perm[fixed[0]]
    return perm


def evidence_and_reference(model: BiCroModel, image_emb: np.ndarray, text_emb: np.ndarray,
                           keys: list[str] | None, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The model's outputs for the pairs, their evidence, and the evidence of the same pairs with their images
    permuted (what a mismatched pair looks like to this model)."""
    outputs = model.score(image_emb, text_emb, keys)
    reference = model.score(image_emb[reference_pairing(len(image_emb), seed)], text_emb)
    return outputs, evidence_matrix(outputs), evidence_matrix(reference)


def out_of_fold(image_emb: np.ndarray, text_emb: np.ndarray, keys: list[str], params: BiCroParams,
                train: Callable[[np.ndarray], BiCroModel]) -> OutOfFold:
    """Each fold's pairs (and their re-pairing) scored by a model trained on the other folds (`train(rows)`)."""
    n, folds = len(image_emb), params.calibration_folds
    fold = fold_of(n, folds, params.seed)
    observed, reference = (np.zeros((n, evidence_width(params.anchor_margins == "on"))) for _ in range(2))
    for k in range(folds):
        rows, others = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        model = train(others)
        _, observed[rows], reference[rows] = evidence_and_reference(
            model, image_emb[rows], text_emb[rows], [keys[i] for i in rows], params.seed)
    return OutOfFold(observed, reference)


def calibrate_clean_score(model: BiCroModel, image_emb: np.ndarray, text_emb: np.ndarray, keys: list[str],
                          train: Callable[[np.ndarray], BiCroModel] | None = None,
                          held_out: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Fit the model's clean_score (models/clean_score.py, models/calibration.py) and return the training pairs'
    outputs, clean_score included. On held-out pairs when given; else cross-fitted (fold models from
    `train(rows)`) when there are enough pairs; else on the training pairs themselves."""
    seed = model.params.seed
    outputs, evidence, reference = evidence_and_reference(model, image_emb, text_emb, keys, seed)
    if held_out is not None and len(held_out[0]) >= 2:
        _, held, held_reference = evidence_and_reference(model, held_out[0], held_out[1], None, seed)
        model.clean_scorer = CleanScorer.fit(held, held_reference)
        logger.info("clean_score calibrated on %d held-out pairs", len(held))
    elif train is not None and can_cross_fit(len(keys), model.params.calibration_folds):
        full = CleanScorer.fit(evidence, reference)
        model.clean_scorer = cross_fitted(full, evidence, out_of_fold(image_emb, text_emb, keys, model.params, train))
    else:
        model.clean_scorer = CleanScorer.fit(evidence, reference)
    return outputs | {"clean_score": model.clean_scorer(evidence)}


def noisy_start_epoch(params: BiCroParams) -> int:
    return params.warmup_epochs + int(params.noisy_start * (params.epochs - params.warmup_epochs))


def run_cotraining(
    trainer: CoTrainer,
    data: PairData,
    bank: NegativeBank,
    params: BiCroParams,
    log_every: int,
    t0: float,
    monitor: Callable[[int, CoTrainer, list[Division] | None, list[EpochLabels] | None], None] | None = None,
    keep_embeddings: bool = False,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> None:
    """The co-training loop. ``monitor`` (development only) sees each epoch's divisions and labels; the divisions
    keep their pair embeddings only with ``keep_embeddings`` (4 GB per division at 1M pairs)."""
    dev = trainer.device
    for epoch in range(params.epochs):
        trainer.set_epoch(epoch)
        if epoch < params.warmup_epochs:
            losses = [trainer.warmup_epoch(k, params.warmup_keep_ratio) for k in range(2)]
            if log_every and (epoch + 1) % log_every == 0:
                _log_epoch(epoch, params, {"warmup_loss": [round(x, 4) for x in losses]}, t0)
            if on_epoch is not None:
                on_epoch(epoch, {"warmup_loss": losses})
            if monitor is not None:
                monitor(epoch, trainer, None, None)
            continue
        divs, labs = divide_and_label(trainer, data, bank, params, keep_embeddings=keep_embeddings)
        with_noisy = epoch >= noisy_start_epoch(params)
        info: dict = {}
        for k in range(2):
            lab = labs[k]
            clean_idx = np.flatnonzero(lab.train_clean)
            noisy_idx = np.flatnonzero(~lab.clean)
            if params.drop_zero_labels:
                noisy_idx = noisy_idx[lab.labels[noisy_idx] > 0]
            ct = torch.from_numpy(clean_idx).to(dev)
            nt = torch.from_numpy(noisy_idx).to(dev) if with_noisy else None
            labels_t = torch.from_numpy(lab.labels.astype(np.float32)).to(dev)
            loss = trainer.train_epoch(
                k, ct, labels_t[ct], nt, labels_t[nt] if nt is not None else None
            )
            info[f"net{k}"] = {
                "loss": round(loss, 4),
                "clean": int(lab.clean.sum()),
                "trained": int(lab.train_clean.sum()),
                "noisy_used": int(len(noisy_idx)) if with_noisy else 0,
                "noisy_w": round(divs[1 - k].mixture.noisy_weight(), 3),
            }
        if log_every and (epoch + 1) % log_every == 0:
            _log_epoch(epoch, params, info, t0)
        if on_epoch is not None:
            on_epoch(epoch, info)
        if monitor is not None:
            monitor(epoch, trainer, divs, labs)


def divide_and_label(
    trainer: CoTrainer, data: PairData, bank: NegativeBank, params: BiCroParams, keep_embeddings: bool = False
) -> tuple[list[Division], list[EpochLabels]]:
    """Each network's division and the labels it gives its peer (co-teaching: labs[k] comes from net 1 - k).

    One division at a time, its embeddings dropped once its labels exist (unless `keep_embeddings`): at 1M
    pairs each division holds 4 GB, and the consistency space makes centred copies of it.
    """
    divs: list[Division] = []
    labs: list[EpochLabels | None] = [None, None]
    groups = query_groups(data)
    for j in range(2):
        div = _divide(trainer.nets[j], data, bank, params)
        labs[1 - j] = labels_from_division(div, params, consume=not keep_embeddings, groups=groups)
        if not keep_embeddings:  # new empty tensors, not [:0] views, which would keep the storage alive
            div = replace(div, img_emb=div.img_emb.new_zeros((0,)), txt_emb=div.txt_emb.new_zeros((0,)))
        divs.append(div)
    return divs, [lab for lab in labs if lab is not None]


def _divide(net: Matcher, data: PairData, bank: NegativeBank, params: BiCroParams) -> Division:
    return divide(net, data, bank, params.alpha, params.division, params.mixture_iterations, params.seed)


def finalise(
    trainer: CoTrainer,
    data: PairData,
    bank: NegativeBank,
    params: BiCroParams,
    keys: list[str],
    aligned: bool,
    device: str,
) -> BiCroModel:
    """Final divisions of both networks; anchors = the most confident pairs of their consensus clean set."""
    divs = [_divide(net, data, bank, params) for net in trainer.nets]
    p_mean = np.mean([d.p_clean for d in divs], axis=0)
    anchors = select_anchors(p_mean, clean_set(p_mean, params.clean_threshold), params.anchor_top_k)
    centers = None
    if params.center_consistency:
        centers = [(d.img_emb.mean(dim=0), d.txt_emb.mean(dim=0)) for d in divs]
    model = BiCroModel(
        params,
        trainer.nets,
        [d.mixture for d in divs],
        [(d.loss_min, d.loss_max) for d in divs],
        bank,
        torch.zeros(0),
        torch.zeros(0),
        [keys[i] for i in anchors],
        aligned,
        device,
        centers,
    )
    a = torch.from_numpy(anchors).to(data.image.device)
    anchor_img, anchor_txt = model.consistency_embeddings([d.img_emb[a] for d in divs], [d.txt_emb[a] for d in divs])
    model.anchor_img, model.anchor_txt = anchor_img.contiguous(), anchor_txt.contiguous()
    return model
