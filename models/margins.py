"""Anchor margins: how much better a pair's caption fits its image than the best anchor's does, and vice versa.

For a pair (I, T) in the consistency space (models.bicro.BiCroModel.consistency_embeddings), with the anchor bank
(A_img, A_txt):

    margin_i2t = cos(I, T) - max_a cos(I, A_txt[a])    (the image against every anchor caption)
    margin_t2i = cos(I, T) - max_a cos(T, A_img[a])    (the caption against every anchor image)

never counting the pair's own anchor row. A clean pair's caption beats most anchor captions for its image; a
near-miss or random caption rarely does. Two more evidence columns for clean_score (models/clean_score.py), measured
in docs/bicro.md#anchor-margins. The searches reuse the scoring state's anchor indexes (models/anchors.py): the
caption index answers image queries and the image index caption queries, on the same fixed-shape chunks and with
the same self-exclusion as the consistency search, so a pair's margins never depend on the other pairs of a call.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from bicro_clean.models.anchors import AnchorIndex, nearest_anchor
from bicro_clean.models.forward import chunked

MARGIN_COLUMNS = ("margin_i2t", "margin_t2i")
# The best anchor's cosine when no anchor is left to compare with (an empty bank, or a one-row bank that is the
# pair's own row): the lowest a cosine can be, so the margin only says the caption fits its image this well.
NO_ANCHOR_COSINE = -1.0


def resolve_anchor_margins(setting: str, device_type: str) -> Literal["on", "off"]:
    """The fit-time choice for `anchor_margins`: "auto" is on where the fit runs on CUDA (two more anchor searches
    per pair cost little there) and off on the CPU (docs/bicro.md#anchor-margins measures the cost)."""
    if setting == "auto":
        return "on" if device_type == "cuda" else "off"
    if setting not in ("on", "off"):
        raise ValueError(f"anchor_margins: {setting!r} is not one of auto, on, off")
    return setting  # type: ignore[return-value]


def _best_cosine(queries: torch.Tensor, bank: torch.Tensor, best: np.ndarray, chunk: int) -> torch.Tensor:
    """cos(query n, bank[best[n]]) on fixed-shape chunks; NO_ANCHOR_COSINE where best[n] is -1."""
    rows = torch.from_numpy(np.maximum(best, 0)).to(queries.device)
    if bank.shape[0] == 0:
        return torch.full((queries.shape[0],), NO_ANCHOR_COSINE, device=queries.device)
    d = queries.shape[1]
    gathered = torch.cat([queries, bank[rows].to(queries.dtype)], dim=1)
    cos = chunked(lambda x: (x[:, :d] * x[:, d:]).sum(1)[:, None], gathered, chunk)[:, 0]
    return torch.where(torch.from_numpy(best >= 0).to(cos.device), cos, torch.full_like(cos, NO_ANCHOR_COSINE))


def anchor_margins(
    img: torch.Tensor,
    txt: torch.Tensor,
    anchor_img: torch.Tensor,
    anchor_txt: torch.Tensor,
    own: np.ndarray,
    indexes: tuple[AnchorIndex, AnchorIndex] | None,
    groups: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin_i2t, margin_t2i) of pairs given by their consistency-space vectors `img`, `txt` (N, d).

    `own`: each pair's row in the anchor bank or -1; `indexes`: the (image, caption) AnchorIndexes of the bank
    (None: exact search); `groups`: the distinct image / caption rows (see models.anchors.nearest_anchor)."""
    idx_img, idx_txt = indexes if indexes is not None else (None, None)
    grp_img, grp_txt = groups if groups is not None else (None, None)
    d = img.shape[1]
    pos = chunked(lambda x: (x[:, :d] * x[:, d:]).sum(1)[:, None], torch.cat([img, txt], dim=1), chunk)[:, 0]
    caption_for_image = nearest_anchor(img, anchor_txt, own, idx_txt, grp_img, chunk)
    image_for_caption = nearest_anchor(txt, anchor_img, own, idx_img, grp_txt, chunk)
    margin_i2t = pos - _best_cosine(img, anchor_txt, caption_for_image, chunk)
    margin_t2i = pos - _best_cosine(txt, anchor_img, image_for_caption, chunk)
    return margin_i2t, margin_t2i
