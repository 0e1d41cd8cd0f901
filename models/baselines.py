"""The baselines BiCro is measured against, on the same co-training machinery and recipe (models.cotrain):

- plain (`fit_plain`): hardest-negative triplet on the given pairs, no division: "vanilla" on every pair,
  "oracle" on the truly clean pairs only;
- NCR (`fit_ncr`, Huang et al., NeurIPS 2021): GMM co-division on per-pair loss, co-rectified soft labels.

Both take frozen pair embeddings, as `models.train.fit_bicro` does. The Flickr8k benchmark that compares them is
in the lab (lab/evaluate.py), which imports this module, never the other way round.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from bicro_clean.models.consistency import clean_set
from bicro_clean.models.cotrain import CoTrainer, Division, NegativeBank, PairData, divide, seeded, torch_threads
from bicro_clean.models.losses import mean_triplet
from bicro_clean.models.matcher import Matcher
from bicro_clean.models.params import BiCroParams
from bicro_clean.models.train import noisy_start_epoch

logger = logging.getLogger(__name__)

Relabel = Callable[[int, torch.Tensor, torch.Tensor | None, bool], torch.Tensor]


# ------------------------------------------------------------------------------------------ plain


def _plain_recipe(trainer: CoTrainer, idx: torch.Tensor, params: BiCroParams) -> None:
    """vanilla / oracle: warm-up epochs on the mean hinge over all given pairs, then hardest negatives."""
    for epoch in range(params.epochs):
        trainer.set_epoch(epoch)
        for k in range(2):
            if epoch < params.warmup_epochs:
                trainer.warmup_epoch(k, 1.0, idx)
            else:
                trainer.train_epoch(k, idx, None)
        logger.info("plain epoch %d/%d done", epoch + 1, params.epochs)


def fit_plain(image: np.ndarray, text: np.ndarray, params: BiCroParams, device: str = "cpu",
              rows: np.ndarray | None = None) -> list[Matcher]:
    """Two matchers trained on the pairs `rows` (every pair when None) with BiCro's recipe, nothing divided."""
    with seeded(params.seed, device), torch_threads(params.threads):
        data = PairData.build(image, text, device)
        trainer = CoTrainer(data, params.train_config(), params.seed, False, device)
        idx = np.arange(len(data)) if rows is None else np.asarray(rows, dtype=np.int64)
        _plain_recipe(trainer, torch.from_numpy(idx).to(device), params)
    return trainer.nets


# -------------------------------------------------------------------------------------------- NCR


def ncr_predict(sims: torch.Tensor, negatives: torch.Tensor, alpha: float) -> torch.Tensor:
    """NCR's per-batch correspondence estimate: alpha minus the mean hinge, scaled by the batch's top 10%."""
    margins = torch.full((sims.shape[0],), alpha, device=sims.device)
    p = (alpha - mean_triplet(sims, margins, negatives) / 2).clamp(0, alpha)
    top = torch.topk(p, sims.shape[0] // 10 + 1).values.mean()
    return (p / top.clamp(min=1e-12)).clamp(0, 1)


def _ncr_relabel(trainer: CoTrainer, w_peer: torch.Tensor, alpha: float) -> Relabel:
    """Co-rectification: clean pairs y = w + (1-w) P_own; noisy pairs y = (P_A + P_B) / 2 (current nets)."""

    def relabel(k: int, idx: torch.Tensor, _labels: torch.Tensor | None, is_clean: bool) -> torch.Tensor:
        neg = trainer.data.negatives(idx)
        with torch.no_grad():
            preds = []
            for j in ([k] if is_clean else [0, 1]):
                net = trainer.nets[j]
                was = net.training
                net.eval()
                preds.append(ncr_predict(net(trainer.data.image[idx], trainer.data.text[idx]), neg, alpha))
                net.train(was)
            if is_clean:
                w = w_peer[idx]
                return w + (1 - w) * preds[0]
            return (preds[0] + preds[1]) / 2

    return relabel


def fit_ncr(
    image: np.ndarray,
    text: np.ndarray,
    params: BiCroParams,
    device: str = "cpu",
    monitor: Callable[[int, CoTrainer], None] | None = None,
) -> tuple[list[Matcher], dict[str, np.ndarray]]:
    """NCR on frozen pair embeddings: the two matchers and, per training pair, soft_label and p_clean (plus each
    net's mixture noisy weight), from the final state."""
    with seeded(params.seed, device), torch_threads(params.threads):
        data = PairData.build(image, text, device)
        bank = NegativeBank.sample(data, params.bank_size, params.seed)
        trainer = CoTrainer(data, params.train_config(), params.seed, False, device)
        noisy_from = noisy_start_epoch(params)
        for epoch in range(params.epochs):
            trainer.set_epoch(epoch)
            if epoch < params.warmup_epochs:
                for k in range(2):
                    trainer.warmup_epoch(k, 1.0)  # NCR warms up on every pair
                continue
            divs = [_ncr_divide(trainer.nets[k], data, bank, params) for k in range(2)]
            for k in range(2):
                peer = divs[1 - k]
                clean = clean_set(peer.p_clean, params.clean_threshold)
                w = torch.from_numpy(peer.p_clean.astype(np.float32)).to(device)
                ct = torch.from_numpy(np.flatnonzero(clean)).to(device)
                nt = torch.from_numpy(np.flatnonzero(~clean)).to(device) if epoch >= noisy_from else None
                relabel = _ncr_relabel(trainer, w, params.alpha)
                trainer.train_epoch(k, ct, None, nt, None, relabel=relabel, drop_zero=params.drop_zero_labels)
            clean_sizes = [int((d.p_clean > params.clean_threshold).sum()) for d in divs]
            logger.info("ncr epoch %d/%d: clean sets %s", epoch + 1, params.epochs, clean_sizes)
            if monitor is not None:
                monitor(epoch, trainer)
        divs = [_ncr_divide(trainer.nets[k], data, bank, params) for k in range(2)]
        outputs = _ncr_outputs(trainer, divs, params, device)
    return trainer.nets, outputs


def _ncr_divide(net: Matcher, data: PairData, bank: NegativeBank, params: BiCroParams) -> Division:
    """NCR divides with a GMM whatever `params.division` says (BiCro's default is a BMM)."""
    return divide(net, data, bank, params.alpha, "gmm", params.mixture_iterations, params.seed)


def _ncr_outputs(trainer: CoTrainer, divs: list[Division], params: BiCroParams,
                 device: str) -> dict[str, np.ndarray]:
    """Final labels as the next epoch would use them, with predictions on fixed seeded batches."""
    n = len(trainer.data)
    gen = torch.Generator().manual_seed(params.seed + 17)
    perm = torch.randperm(n, generator=gen).to(device)
    labels = np.zeros((2, n))
    for k in range(2):
        peer = divs[1 - k]
        clean = clean_set(peer.p_clean, params.clean_threshold)
        w = torch.from_numpy(peer.p_clean.astype(np.float32)).to(device)
        relabel = _ncr_relabel(trainer, w, params.alpha)
        for s in range(0, n, params.batch_size):
            b = perm[s : s + params.batch_size]
            if b.numel() < 2:
                b = perm[-params.batch_size :]
            bc = torch.from_numpy(clean[b.cpu().numpy()]).to(device)
            lc = relabel(k, b, None, True)
            ln = relabel(k, b, None, False)
            labels[k, b.cpu().numpy()] = torch.where(bc, lc, ln).double().cpu().numpy()
    return {
        "soft_label": labels.mean(axis=0).astype(np.float32),
        "p_clean": np.mean([d.p_clean for d in divs], axis=0).astype(np.float32),
        "noisy_weight": np.array([d.mixture.noisy_weight() for d in divs]),
    }
