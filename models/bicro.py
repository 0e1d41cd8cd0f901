"""BiCro (Yang et al., CVPR 2023) on frozen embeddings: the fitted scoring model and its checkpoint.

Two matchers co-train (models/train.py); each epoch every network divides the training pairs with a
2-component mixture on its per-pair loss, picks the most confident clean pairs as anchors and, in its own
embedding space, measures how consistent each pair's cross-modal similarities are with its nearest anchors
(bidirectional similarity consistency, models/consistency.py). Those soft labels set per-pair triplet margins
for its PEER. This module owns what a fit leaves behind: `BiCroModel`, which scores pairs never seen in
training exactly as in training, and its save/load format. See docs/bicro.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bicro_clean.models.anchors import AnchorIndex
from bicro_clean.models.clean_score import CleanScorer, evidence_matrix, evidence_width
from bicro_clean.models.consistency import consistency_labels, consistency_space, soft_labels, top_anchor_mask
from bicro_clean.models.cotrain import NegativeBank, embed_pairs, torch_threads
from bicro_clean.models.forward import chunked, row_hashes
from bicro_clean.models.losses import bank_mean_hinge
from bicro_clean.models.margins import MARGIN_COLUMNS, anchor_margins, resolve_anchor_margins
from bicro_clean.models.matcher import Matcher
from bicro_clean.models.mixture import Mixture, mixture_from_tensor, normalise_losses
from bicro_clean.models.params import BiCroParams

logger = logging.getLogger(__name__)

OUTPUT_FLOAT = ("p_clean", "consistency", "r_i2t", "r_t2i", "soft_label", "match_score", "loss0", "loss1")
OUTPUT_INT = ("anchor_for_image", "anchor_for_text")
FORMAT_VERSION = 3  # 2: the clean_score calibration (models/clean_score.py); 3: anchor margins (models/margins.py)
# Versions load() reads: a version-2 checkpoint predates anchor margins, so it has them off (5 evidence columns).
READABLE_VERSIONS = (2, 3)


# Rows per fixed-shape scoring chunk. On the 2-core AVX2 machine MKL's sgemm ran at 17 GFLOP/s on 256-row
# chunks and 45 on 1,024 (512 -> 1,024 linear, same load), so smaller chunks would cost more than the padding of
# a short last chunk (faiss IndexFlatIP likewise: 2.1x slower on 256-query chunks than on 1,024).
SCORE_CHUNK_CPU = 1024
# On a GPU a chunk is a few kernel launches whatever its size: 4,096 rows keep the exact search's score matrix at
# 1 GiB with the 65,536-anchor cap (chunk x anchors x 4 bytes) and the bank's (chunk, bank_size) temporaries small.
SCORE_CHUNK_CUDA = 4096
# Rows per score() call the pipeline hands over (pipeline/score.py reads its Parquet in batches of this size):
# on the CPU 4 chunks (memory bounded, results identical whatever the batch), on a GPU 16 chunks per transfer.
SCORE_BATCH_CPU = 4096
SCORE_BATCH_CUDA = 65_536


def score_sizes(device_type: str) -> tuple[int, int]:
    """(rows per fixed-shape chunk, rows per pipeline batch) for scoring on `device_type` ("cpu", "cuda")."""
    if device_type == "cuda":
        return SCORE_CHUNK_CUDA, SCORE_BATCH_CUDA
    return SCORE_CHUNK_CPU, SCORE_BATCH_CPU


def _row_groups(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each distinct hash, each row's distinct id)."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return first.astype(np.int64), inverse.reshape(-1).astype(np.int64)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])


@dataclass
class ScoringState:
    """What every score() call reuses: each network's embedding of the negative bank, the bank's row hashes on
    the model's device, and the (image, text) anchor indexes. Built once per loaded model."""

    bank_emb: list[tuple[torch.Tensor, torch.Tensor]]
    bank_ih: torch.Tensor
    bank_th: torch.Tensor
    indexes: tuple[AnchorIndex, AnchorIndex] | None

    @classmethod
    def build(cls, model: "BiCroModel") -> "ScoringState":
        p, dev = model.params, model.device
        if dev.type == "cpu":
            # keep glibc from unmapping every MB-sized activation after use (page faults dominated small ops)
            from bicro_clean.models.encoders import tune_cpu_allocator

            tune_cpu_allocator()
        bank_emb = [embed_pairs(net, model.bank.image.to(dev), model.bank.text.to(dev)) for net in model.nets]
        indexes = None
        if model.anchor_img.shape[0] > 0:
            indexes = tuple(
                AnchorIndex.build(bank.to(dev), p.anchor_index, p.ivf_nlist, p.ivf_nprobe, p.seed,
                                  exact="torch" if dev.type == "cuda" else "faiss", scoring=True)
                for bank in (model.anchor_img, model.anchor_txt)
            )
        return cls(bank_emb, torch.from_numpy(model.bank.image_hash).to(dev),
                   torch.from_numpy(model.bank.text_hash).to(dev), indexes)


class BiCroModel:
    """Both networks plus everything needed to score pairs never seen in training, exactly as in training."""

    def __init__(
        self,
        params: BiCroParams,
        nets: list[Matcher],
        mixtures: list[Mixture],
        loss_ranges: list[tuple[float, float]],
        bank: NegativeBank,
        anchor_img: torch.Tensor,
        anchor_txt: torch.Tensor,
        anchor_keys: list[str],
        aligned: bool,
        device: str | torch.device = "cpu",
        centers: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        # anchor_margins resolved once, here (on the fit's device) and kept resolved: clean_score has one weight
        # per evidence column, so a checkpoint scores with the fit's choice on any device (load passes it resolved)
        resolved = resolve_anchor_margins(params.anchor_margins, torch.device(device).type)
        self.params = params if resolved == params.anchor_margins else params.model_copy(
            update={"anchor_margins": resolved})
        self.centers = centers  # per network (image, text) mean used by consistency_space, or None
        self.nets = [net.eval() for net in nets]
        self.mixtures = mixtures
        self.loss_ranges = loss_ranges
        self.bank = bank
        self._state: ScoringState | None = None  # search indexes + bank embeddings, built on first score()
        self.anchor_img = anchor_img
        self.anchor_txt = anchor_txt
        self.anchor_keys = list(anchor_keys)
        self.aligned = aligned
        self.device = torch.device(device)
        self.clean_scorer: CleanScorer | None = None  # fitted by models.train.finalise, after the anchors

    # Replacing the anchor bank (finalise does, after construction) drops the prepared search state.
    @property
    def anchor_img(self) -> torch.Tensor:
        return self._anchor_img

    @anchor_img.setter
    def anchor_img(self, value: torch.Tensor) -> None:
        self._anchor_img, self._state = value, None

    @property
    def anchor_txt(self) -> torch.Tensor:
        return self._anchor_txt

    @anchor_txt.setter
    def anchor_txt(self, value: torch.Tensor) -> None:
        self._anchor_txt, self._state = value, None

    @property
    def anchor_keys(self) -> list[str]:
        return self._anchor_keys

    @anchor_keys.setter
    def anchor_keys(self, value: list[str]) -> None:
        self._anchor_keys = list(value)
        self._anchor_pos = {key: i for i, key in enumerate(self._anchor_keys)}

    @property
    def margins_on(self) -> bool:
        """Whether score() outputs margin_i2t / margin_t2i and clean_score weighs them (fixed at fit time)."""
        return self.params.anchor_margins == "on"

    # ---- scoring

    @property
    def score_chunk(self) -> int:
        """Rows per fixed-shape chunk when scoring (see SCORE_CHUNK_CPU); larger on a GPU (fewer launches)."""
        return score_sizes(self.device.type)[0]

    @property
    def score_batch_rows(self) -> int:
        """Rows the pipeline should pass per score() call: larger on a GPU (see SCORE_BATCH_CUDA)."""
        return score_sizes(self.device.type)[1]

    def scoring_state(self) -> "ScoringState":
        """Anchor indexes and bank embeddings: built once per loaded model, not once per score() call."""
        if self._state is None:
            start = time.perf_counter()
            with torch.no_grad(), torch_threads(self.params.threads):
                self._state = ScoringState.build(self)
            logger.info("scoring state: %d anchors, %s index, %.1fs", len(self.anchor_keys),
                        self._state.indexes[0].kind if self._state.indexes else "-", time.perf_counter() - start)
        return self._state

    def consistency_embeddings(
        self, img_nets: list[torch.Tensor], txt_nets: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both networks' (centred) unit vectors side by side: cosines there are the mean of the two nets'."""
        if self.centers is not None:
            img_nets = [consistency_space(x, c[0]) for x, c in zip(img_nets, self.centers)]
            txt_nets = [consistency_space(x, c[1]) for x, c in zip(txt_nets, self.centers)]
        return ensemble(img_nets), ensemble(txt_nets)

    def _self_index(self, keys: list[str] | None, n: int) -> np.ndarray:
        if keys is None:
            return np.full(n, -1, dtype=np.int64)
        if len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} pairs")
        return np.array([self._anchor_pos.get(k, -1) for k in keys], dtype=np.int64)

    def _bank_losses(self, k: int, img: torch.Tensor, txt: torch.Tensor, ih: torch.Tensor,
                     th: torch.Tensor) -> np.ndarray:
        """models.cotrain.bank_losses with the bank embedded once (ScoringState) instead of on every call."""
        st, chunk = self.scoring_state(), self.score_chunk
        bank_img, bank_txt = st.bank_emb[k]
        out = []
        for start in range(0, img.shape[0], chunk):
            qi, qt = img[start : start + chunk], txt[start : start + chunk]
            hi, ht = ih[start : start + chunk], th[start : start + chunk]
            n = qi.shape[0]
            if n < chunk:  # same kernel shapes for every chunk
                qi, qt = _pad_rows(qi, chunk), _pad_rows(qt, chunk)
                hi, ht = _pad_rows(hi, chunk), _pad_rows(ht, chunk)
            pos = (qi * qt).sum(dim=1)
            valid = ((hi[:, None] != st.bank_ih[None, :]) & (ht[:, None] != st.bank_th[None, :])).float()
            out.append(bank_mean_hinge(pos, qi @ bank_txt.T, qt @ bank_img.T, self.params.alpha, valid)[:n])
        return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)

    def _score_block(self, image_np: np.ndarray, text_np: np.ndarray, own: np.ndarray) -> dict[str, np.ndarray]:
        st, chunk = self.scoring_state(), self.score_chunk
        # Raw rows hashed once: the hashes skip same-row bank negatives, and their groups let each distinct
        # image / caption go through the heads and the anchor search once (5 captions share one photo).
        ih, th = row_hashes(image_np), row_hashes(text_np)
        g_img, g_txt = _row_groups(ih), _row_groups(th)
        image = torch.from_numpy(image_np[g_img[0]]).to(self.device)
        text = torch.from_numpy(text_np[g_txt[0]]).to(self.device)
        inv_i = torch.from_numpy(g_img[1]).to(self.device)
        inv_t = torch.from_numpy(g_txt[1]).to(self.device)
        ih_t, th_t = torch.from_numpy(ih).to(self.device), torch.from_numpy(th).to(self.device)
        p_nets, losses_nets, img_u, txt_u, img_nets, txt_nets = [], [], [], [], [], []
        for k, (net, mix, (lo, hi)) in enumerate(zip(self.nets, self.mixtures, self.loss_ranges)):
            img_u.append(chunked(net.embed_images, image, chunk))
            txt_u.append(chunked(net.embed_texts, text, chunk))
            img_nets.append(img_u[-1][inv_i])
            txt_nets.append(txt_u[-1][inv_t])
            losses_nets.append(normalise_losses(self._bank_losses(k, img_nets[-1], txt_nets[-1], ih_t, th_t), lo, hi))
            p_nets.append(mix.posterior_clean(losses_nets[-1]))
        both = torch.cat([torch.cat(img_nets, 1), torch.cat(txt_nets, 1)], 1)
        d = img_nets[0].shape[1]
        # mean of the two networks' cosines, on fixed-shape chunks
        match = chunked(lambda x: ((x[:, : 2 * d] * x[:, 2 * d :]).sum(1) / 2)[:, None], both, chunk)[:, 0]
        ens_img_u, ens_txt_u = self.consistency_embeddings(img_u, txt_u)
        # the anchor searches run once per distinct image / caption (the groups of the raw rows)
        c, r_i2t, r_t2i, a_i, a_t = consistency_labels(
            ens_img_u[inv_i], ens_txt_u[inv_t], self.anchor_img, self.anchor_txt, own, st.indexes, (g_img, g_txt),
            chunk,
        )
        c_np = c.double().cpu().numpy()
        top = top_anchor_mask(own, self.params.top_anchors)
        labels = [
            soft_labels(p, c_np, top, self.params.clean_threshold, self.params.noisy_label_threshold) for p in p_nets
        ]
        out = {
            "p_clean": np.mean(p_nets, axis=0).astype(np.float32),
            "consistency": c_np.astype(np.float32),
            "r_i2t": r_i2t.cpu().numpy().astype(np.float32),
            "r_t2i": r_t2i.cpu().numpy().astype(np.float32),
            "soft_label": np.mean(labels, axis=0).astype(np.float32),
            "match_score": match.cpu().numpy().astype(np.float32),
            "anchor_for_image": a_i.numpy().astype(np.int64),
            "anchor_for_text": a_t.numpy().astype(np.int64),
            "loss0": losses_nets[0],
            "loss1": losses_nets[1],
        }
        if self.margins_on:  # same vectors, groups, self-exclusion and chunks as the consistency search above
            margins = anchor_margins(ens_img_u[inv_i], ens_txt_u[inv_t], self.anchor_img, self.anchor_txt, own,
                                     st.indexes, (g_img, g_txt), chunk)
            out |= {name: m.cpu().numpy().astype(np.float32) for name, m in zip(MARGIN_COLUMNS, margins)}
        if self.clean_scorer is not None:  # None only in finalise's own scoring, before the calibration exists
            # the evidence is read from the output columns, exactly as train.calibrate_clean_score reads it
            out["clean_score"] = self.clean_scorer(evidence_matrix(out))
        return out

    def score(
        self, image_emb: np.ndarray, text_emb: np.ndarray, keys: list[str] | None = None, batch_size: int = 65536
    ) -> dict[str, np.ndarray]:
        """Per-pair outputs; a pair's scores depend only on the pair (and its key), never on the other pairs."""
        image_emb = np.ascontiguousarray(image_emb, dtype=np.float32)
        text_emb = np.ascontiguousarray(text_emb, dtype=np.float32)
        n = len(image_emb)
        if len(text_emb) != n:
            raise ValueError(f"{n} images but {len(text_emb)} texts")
        own = self._self_index(keys, n)
        chunk = self.score_chunk
        step = max(chunk, (batch_size // chunk) * chunk)
        parts = []
        with torch.no_grad(), torch_threads(self.params.threads):
            for s in range(0, n, step):
                parts.append(self._score_block(image_emb[s : s + step], text_emb[s : s + step], own[s : s + step]))
        if not parts:
            floats = OUTPUT_FLOAT + (MARGIN_COLUMNS if self.margins_on else ())
            empty = {k: np.zeros(0, np.float32) for k in floats} | {k: np.zeros(0, np.int64) for k in OUTPUT_INT}
            return empty | ({"clean_score": np.zeros(0)} if self.clean_scorer is not None else {})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # ---- persistence

    def save(self, path: str | Path) -> None:
        """A directory with tensors.safetensors (plain tensors) and model.json (params, dims, keys)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for k, net in enumerate(self.nets):
            for name, t in net.state_dict().items():
                tensors[f"net{k}.{name}"] = t.detach().cpu().contiguous()
            tensors[f"mixture{k}"] = self.mixtures[k].to_tensor()
            tensors[f"loss_range{k}"] = torch.tensor(self.loss_ranges[k], dtype=torch.float64)
            if self.centers is not None:
                tensors[f"center{k}.image"] = self.centers[k][0].detach().cpu().contiguous()
                tensors[f"center{k}.text"] = self.centers[k][1].detach().cpu().contiguous()
        tensors["bank.image"] = self.bank.image.cpu().contiguous()
        tensors["bank.text"] = self.bank.text.cpu().contiguous()
        tensors["bank.image_hash"] = torch.from_numpy(self.bank.image_hash.copy())
        tensors["bank.text_hash"] = torch.from_numpy(self.bank.text_hash.copy())
        if self.clean_scorer is None:
            raise ValueError("an unfinished model (no clean_score calibration) cannot be saved")
        tensors["clean_scorer"] = self.clean_scorer.to_tensor()
        tensors["anchor.image"] = self.anchor_img.cpu().contiguous()
        tensors["anchor.text"] = self.anchor_txt.cpu().contiguous()
        save_file(tensors, str(path / "tensors.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "params": self.params.model_dump(),
            "aligned": self.aligned,
            "image_dim": int(self.bank.image.shape[1]),
            "text_dim": int(self.bank.text.shape[1]),
            "anchor_keys": self.anchor_keys,
        }
        (path / "model.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "BiCroModel":
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "model.json").read_text())
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format_version')}")
        # the fit's resolved choice; a checkpoint from before anchor margins has them off
        params = BiCroParams.from_dict({"anchor_margins": "off"} | meta["params"])
        tensors = load_file(str(path / "tensors.safetensors"), device="cpu")
        nets, mixtures, ranges = [], [], []
        for k in range(2):
            net = Matcher(
                meta["image_dim"], meta["text_dim"], params.embed_dim, params.hidden_dim, params.dropout, False
            )
            prefix = f"net{k}."
            net.load_state_dict({n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)})
            nets.append(net.to(device))
            mixtures.append(mixture_from_tensor(params.division, tensors[f"mixture{k}"]))
            lo, hi = tensors[f"loss_range{k}"].tolist()
            ranges.append((lo, hi))
        centers = None
        if "center0.image" in tensors:
            centers = [
                (tensors[f"center{k}.image"].to(device), tensors[f"center{k}.text"].to(device)) for k in range(2)
            ]
        bank = NegativeBank(
            tensors["bank.image"].to(device),
            tensors["bank.text"].to(device),
            tensors["bank.image_hash"].numpy(),
            tensors["bank.text_hash"].numpy(),
        )
        model = cls(
            params,
            nets,
            mixtures,
            ranges,
            bank,
            tensors["anchor.image"].to(device),
            tensors["anchor.text"].to(device),
            meta["anchor_keys"],
            meta["aligned"],
            device,
            centers,
        )
        model.clean_scorer = CleanScorer.from_tensor(tensors["clean_scorer"])
        width = evidence_width(model.margins_on)
        if len(model.clean_scorer.weights) != width:
            raise ValueError(f"{path}: clean_score has {len(model.clean_scorer.weights)} evidence weights, the "
                             f"checkpoint's anchor_margins={params.anchor_margins} needs {width}")
        return model


def ensemble(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the networks' unit vectors, scaled so cosines in the result are the mean of theirs."""
    return torch.cat(parts, dim=1) / math.sqrt(len(parts))
