"""The co-training machinery shared by every method (vanilla, NCR, BiCro, oracle).

Two matchers A and B with their own seeds, initialisations and batch orders. The trainer knows how to warm up,
how to run one epoch of hardest-negative training with per-pair soft labels, and how to compute everything a
division step needs (embeddings of all pairs and per-pair losses against a fixed negative bank). What the
labels are is the business of each method (models/train.py, models/baselines.py).

Determinism: every random choice comes from generators seeded by ``seed`` (`seeded`), CPU thread counts are
pinned (`torch_threads`), and forward passes used for scoring run on fixed-shape, zero-padded chunks
(models/forward.py), so a row's result never depends on which other rows share its chunk.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import faiss
import numpy as np
import torch

from bicro_clean.models.forward import CHUNK, dense_ids, embed_rows, row_hashes, unique_rows
from bicro_clean.models.losses import bank_mean_hinge, hardest_triplet, mean_triplet, small_loss_mean, soft_margin
from bicro_clean.models.matcher import Matcher
from bicro_clean.models.mixture import Mixture, fit_mixture, normalise_losses

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- data


@dataclass
class PairData:
    """Frozen embeddings of the training pairs, on the training device, plus duplicate-row bookkeeping."""

    image: torch.Tensor  # (N, Di)
    text: torch.Tensor  # (N, Dt)
    image_hash: np.ndarray  # (N,) int64
    text_hash: np.ndarray  # (N,) int64
    image_group: torch.Tensor  # (N,) dense ids of identical image rows, on device
    text_group: torch.Tensor  # (N,)
    # distinct rows of the frozen inputs (first row, inverse map; forward.unique_rows), found once: every division
    # embeds only the distinct rows, without hashing every input row again
    image_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    text_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, image: np.ndarray, text: np.ndarray, device: str | torch.device) -> "PairData":
        if len(image) != len(text):
            raise ValueError(f"{len(image)} images but {len(text)} texts")
        image = np.ascontiguousarray(image, dtype=np.float32)
        text = np.ascontiguousarray(text, dtype=np.float32)
        ih, th = row_hashes(image), row_hashes(text)
        return cls(
            image=torch.from_numpy(image).to(device),
            text=torch.from_numpy(text).to(device),
            image_hash=ih,
            text_hash=th,
            image_group=torch.from_numpy(dense_ids(ih)).to(device),
            text_group=torch.from_numpy(dense_ids(th)).to(device),
            image_rows=unique_rows(ih, device),
            text_rows=unique_rows(th, device),
        )

    def __len__(self) -> int:
        return self.image.shape[0]

    def negatives(self, idx: torch.Tensor) -> torch.Tensor:
        """Valid negative pairs inside a batch: different image rows AND different caption rows."""
        ig, tg = self.image_group[idx], self.text_group[idx]
        return (ig[:, None] != ig[None, :]) & (tg[:, None] != tg[None, :])




# ------------------------------------------------------------------------------------- forward paths



@torch.no_grad()
def embed_pairs(
    net: Matcher,
    image: torch.Tensor,
    text: torch.Tensor,
    groups: tuple[tuple[torch.Tensor, torch.Tensor] | None, tuple[torch.Tensor, torch.Tensor] | None] = (None, None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both heads over their distinct input rows; `groups` = known (image, text) unique_rows (None: hash here)."""
    was_training = net.training
    net.eval()
    img = embed_rows(net.embed_images, image, groups=groups[0])
    txt = embed_rows(net.embed_texts, text, groups=groups[1])
    net.train(was_training)
    return img, txt


# ------------------------------------------------------------------------------------ negative bank


@dataclass
class NegativeBank:
    """A fixed sample of training pairs used as negatives when computing a pair's division loss.

    Fixed and stored in the checkpoint, so the loss (hence p_clean) of any pair, seen or not, depends only on
    the pair itself: no batch composition effects.
    """

    image: torch.Tensor  # (M, Di) raw frozen embeddings
    text: torch.Tensor  # (M, Dt)
    image_hash: np.ndarray  # (M,)
    text_hash: np.ndarray  # (M,)

    @classmethod
    def sample(cls, data: PairData, size: int, seed: int) -> "NegativeBank":
        rng = np.random.default_rng(seed + 7919)
        idx = np.sort(rng.choice(len(data), size=min(size, len(data)), replace=False))
        t = torch.from_numpy(idx).to(data.image.device)
        return cls(data.image[t].clone(), data.text[t].clone(), data.image_hash[idx].copy(), data.text_hash[idx].copy())


@torch.no_grad()
def bank_losses(
    net: Matcher,
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    image_hash: np.ndarray,
    text_hash: np.ndarray,
    bank: NegativeBank,
    alpha: float,
) -> np.ndarray:
    """Per-pair mean-over-negatives hinge against the bank (float64 numpy)."""
    dev = img_emb.device
    bank_groups = (unique_rows(bank.image_hash, dev), unique_rows(bank.text_hash, dev))
    bank_img, bank_txt = embed_pairs(net, bank.image, bank.text, bank_groups)
    bih = torch.from_numpy(bank.image_hash).to(dev)
    bth = torch.from_numpy(bank.text_hash).to(dev)
    ih = torch.from_numpy(np.asarray(image_hash)).to(dev)
    th = torch.from_numpy(np.asarray(text_hash)).to(dev)

    out = []
    for start in range(0, img_emb.shape[0], CHUNK):
        stop = min(start + CHUNK, img_emb.shape[0])
        n = stop - start
        qi, qt = img_emb[start:stop], txt_emb[start:stop]
        hi, ht = ih[start:stop], th[start:stop]
        if n < CHUNK:  # same kernel shapes for every chunk
            pad = CHUNK - n
            qi = torch.cat([qi, qi.new_zeros(pad, qi.shape[1])])
            qt = torch.cat([qt, qt.new_zeros(pad, qt.shape[1])])
            hi = torch.cat([hi, hi.new_zeros(pad)])
            ht = torch.cat([ht, ht.new_zeros(pad)])
        pos = (qi * qt).sum(dim=1)
        valid = ((hi[:, None] != bih[None, :]) & (ht[:, None] != bth[None, :])).float()
        loss = bank_mean_hinge(pos, qi @ bank_txt.T, qt @ bank_img.T, alpha, valid)
        out.append(loss[:n])
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


@dataclass
class Division:
    """One network's view of the training pairs: embeddings, losses and the clean posterior."""

    img_emb: torch.Tensor
    txt_emb: torch.Tensor
    losses: np.ndarray
    loss_min: float
    loss_max: float
    mixture: Mixture
    p_clean: np.ndarray


def divide(
    net: Matcher, data: PairData, bank: NegativeBank, alpha: float, kind: str, iterations: int, seed: int
) -> Division:
    img, txt = embed_pairs(net, data.image, data.text, (data.image_rows, data.text_rows))
    losses = bank_losses(net, img, txt, data.image_hash, data.text_hash, bank, alpha)
    lo, hi = float(losses.min()), float(losses.max())
    x = normalise_losses(losses, lo, hi)
    mixture = fit_mixture(x, kind, iterations, seed)
    return Division(img, txt, losses, lo, hi, mixture, mixture.posterior_clean(x))


# --------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    embed_dim: int
    hidden_dim: int
    dropout: float
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    lr_schedule: str  # "cosine" | "constant" | "step"
    alpha: float
    soft_margin_base: float
    grad_clip: float


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "step":  # NCR-style: one decay by 10x for the last quarter
        return 0.1 if epoch >= int(0.75 * epochs) else 1.0
    if schedule == "cosine":  # evaluated at the epoch's midpoint, never exactly 0
        return 0.5 * (1.0 + math.cos(math.pi * (epoch + 0.5) / epochs))
    raise ValueError(f"unknown lr schedule {schedule!r}")


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device) -> Iterator[None]:
    """Seed torch for the block without disturbing the caller's global RNG state."""
    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Pin torch's and faiss's CPU thread counts for the block (n <= 0: leave them as they are).

    Float sums depend on the thread count, so fit and score run with a fixed count whatever the machine."""
    if n <= 0:
        yield
        return
    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        faiss.omp_set_num_threads(old_faiss)


def make_adamw(net: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused (one pass over each parameter) where torch has the kernel (CPU and CUDA).

    The default single-tensor CPU AdamW makes ~10 passes over the 2.9M head parameters per step: on 2 cores that
    cost 2.8x the fused step (~40 % of a training step's time, forward + backward included)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


class CoTrainer:
    """Two matchers, their optimisers and batch-order generators."""

    def __init__(
        self, data: PairData, cfg: TrainConfig, seed: int, aligned: bool, device: str | torch.device
    ) -> None:
        self.data, self.cfg, self.device = data, cfg, torch.device(device)
        self.nets: list[Matcher] = []
        self.opts: list[torch.optim.Optimizer] = []
        self.gens: list[torch.Generator] = []
        for k in range(2):
            torch.manual_seed(seed * 1_000_003 + 101 * k + 1)  # caller wraps the fit in seeded()
            net = Matcher(
                data.image.shape[1], data.text.shape[1], cfg.embed_dim, cfg.hidden_dim, cfg.dropout, aligned
            ).to(self.device)
            if not aligned:
                net.standardise_inputs(data.image, data.text)
            self.nets.append(net)
            self.opts.append(make_adamw(net, cfg, self.device))
            self.gens.append(torch.Generator().manual_seed(seed * 7_919 + 13 * k + 5))

    def set_epoch(self, epoch: int) -> None:
        f = lr_factor(self.cfg.lr_schedule, epoch, self.cfg.epochs)
        for opt in self.opts:
            for group in opt.param_groups:
                group["lr"] = self.cfg.lr * f

    def _perm(self, k: int, idx: torch.Tensor) -> torch.Tensor:
        order = torch.randperm(idx.numel(), generator=self.gens[k]).to(idx.device)
        return idx[order]

    def _batches(self, k: int, idx: torch.Tensor) -> list[torch.Tensor]:
        """Shuffled batches; a last batch smaller than 2 pairs carries no negatives and is dropped."""
        perm = self._perm(k, idx)
        bs = self.cfg.batch_size
        return [perm[s : s + bs] for s in range(0, perm.numel(), bs) if perm[s : s + bs].numel() >= 2]

    def _sims(self, k: int, idx: torch.Tensor) -> torch.Tensor:
        return self.nets[k](self.data.image[idx], self.data.text[idx])

    def _step(self, k: int, loss: torch.Tensor) -> None:
        opt = self.opts[k]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.nets[k].parameters(), self.cfg.grad_clip)
        opt.step()

    def warmup_epoch(self, k: int, keep_ratio: float, idx: torch.Tensor | None = None) -> float:
        """Mean-over-negatives hinge; only the keep_ratio smallest per-pair losses of each batch contribute."""
        net = self.nets[k]
        net.train()
        idx = torch.arange(len(self.data), device=self.device) if idx is None else idx
        total, steps = 0.0, 0
        for b in self._batches(k, idx):
            margins = torch.full((b.numel(),), self.cfg.alpha, device=self.device)
            per = mean_triplet(self._sims(k, b), margins, self.data.negatives(b))
            loss = small_loss_mean(per, keep_ratio)
            self._step(k, loss)
            total, steps = total + loss.item(), steps + 1
        return total / max(steps, 1)

    def hardest_loss(self, k: int, idx: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            margins = torch.full((idx.numel(),), self.cfg.alpha, device=self.device)
        else:
            margins = soft_margin(labels, self.cfg.alpha, self.cfg.soft_margin_base)
        return hardest_triplet(self._sims(k, idx), margins, self.data.negatives(idx)).mean()

    def train_epoch(
        self,
        k: int,
        clean_idx: torch.Tensor,
        clean_labels: torch.Tensor | None,
        noisy_idx: torch.Tensor | None = None,
        noisy_labels: torch.Tensor | None = None,
        relabel: Callable[[int, torch.Tensor, torch.Tensor | None, bool], torch.Tensor | None] | None = None,
        drop_zero: bool = False,
    ) -> float:
        """One pass over the clean set; when noisy_idx is given, each clean batch is paired with a noisy batch.

        The noisy pairs are shuffled, cut into batches of about batch_size and spread evenly over the clean
        batches, so every noisy pair is seen once per epoch. (Cycling full-size noisy batches, as NCR's code does, shows a small noisy set to the network
        dozens of times per epoch: at 0.2 noise NCR's rSum fell from 240 to 161 the epoch noisy pairs joined.)
        Labels are indexed like the idx tensors they come with. ``relabel(k, batch_idx, batch_labels, is_clean)``
        lets a method refine labels per batch with the current network (NCR's co-rectification does).
        With ``drop_zero``, noisy-batch pairs whose (refined) label is 0 are left out of the loss.
        """
        net = self.nets[k]
        net.train()
        pos_of = torch.full((len(self.data),), -1, dtype=torch.long, device=self.device)
        pos_of[clean_idx] = torch.arange(clean_idx.numel(), device=self.device)
        clean_batches = self._batches(k, clean_idx)
        noisy_batches: list[torch.Tensor] = []
        if noisy_idx is not None and noisy_idx.numel() >= 2 and clean_batches:
            npos_of = torch.full((len(self.data),), -1, dtype=torch.long, device=self.device)
            npos_of[noisy_idx] = torch.arange(noisy_idx.numel(), device=self.device)
            # batches of about batch_size noisy pairs (enough negatives), attached to evenly spaced clean batches
            count = min(len(clean_batches), math.ceil(noisy_idx.numel() / self.cfg.batch_size))
            chunks = torch.tensor_split(self._perm(k, noisy_idx), count)
            at = {(j * len(clean_batches)) // count: chunk for j, chunk in enumerate(chunks)}
            noisy_batches = [at.get(i, noisy_idx[:0]) for i in range(len(clean_batches))]
        total, steps = 0.0, 0
        for i, b in enumerate(clean_batches):
            lab = None if clean_labels is None else clean_labels[pos_of[b]]
            if relabel is not None:
                lab = relabel(k, b, lab, True)
            loss = self.hardest_loss(k, b, lab)
            nb = noisy_batches[i] if noisy_batches else b[:0]
            if nb.numel() >= 2:
                nlab = None if noisy_labels is None else noisy_labels[npos_of[nb]]
                if relabel is not None:
                    nlab = relabel(k, nb, nlab, False)
                if drop_zero and nlab is not None:
                    # a label of 0 still asks the positive to beat every negative (margin 0): memorisation
                    keep = nlab > 0
                    nb, nlab = nb[keep], nlab[keep]
                if nb.numel() >= 2:
                    loss = loss + self.hardest_loss(k, nb, nlab)
            self._step(k, loss)
            total, steps = total + loss.item(), steps + 1
        return total / max(steps, 1)
