"""The matcher: two small heads mapping frozen image / text embeddings into one L2-normalised space.

S(I, T) = cosine of the two head outputs. Each head is a linear projection followed by a residual MLP whose last
layer starts at zero, so at step 0 a head is exactly its linear projection; for an aligned encoder (open_clip)
with matching dimensions the projection starts at the identity and step 0 reproduces the encoder's own cosine.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class Head(nn.Module):
    def __init__(
        self, in_dim: int, embed_dim: int, hidden_dim: int, dropout: float = 0.0, identity_init: bool = False
    ) -> None:
        super().__init__()
        self.in_dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(in_dim, embed_dim)
        self.mlp: nn.Module | None = None
        if hidden_dim > 0:
            last = nn.Linear(hidden_dim, embed_dim)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), last)
        if identity_init:
            if in_dim != embed_dim:
                raise ValueError(f"identity init needs in_dim == embed_dim, got {in_dim} and {embed_dim}")
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(embed_dim))
        with torch.no_grad():
            self.proj.bias.zero_()  # a random bias is a common offset shared by every input

        # Input standardisation (set from training data by set_input_stats, saved in the state dict): frozen
        # features share a large common direction (EfficientNet features are all >= 0, mean cosine ~0.35), which
        # makes every pair look alike at step 0; hardest-negative training then collapses to a constant.
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(()))

    def set_input_stats(self, shift: torch.Tensor, scale: float) -> None:
        with torch.no_grad():
            self.shift.copy_(shift)
            self.scale.fill_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.in_dropout((x - self.shift) * self.scale))
        if self.mlp is not None:
            h = h + self.mlp(h)
        return F.normalize(h, dim=-1)


class Matcher(nn.Module):
    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        embed_dim: int = 512,
        hidden_dim: int = 1024,
        dropout: float = 0.0,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        identity = aligned and image_dim == embed_dim and text_dim == embed_dim
        if aligned and not identity:
            logger.info("aligned encoder but dims %d/%d != %d: heads start random", image_dim, text_dim, embed_dim)
        self.image_head = Head(image_dim, embed_dim, hidden_dim, dropout, identity)
        self.text_head = Head(text_dim, embed_dim, hidden_dim, dropout, identity)

    def standardise_inputs(self, image: torch.Tensor, text: torch.Tensor) -> None:
        """Centre inputs on the training mean and rescale to unit mean norm (not for aligned encoders, whose raw
        cosine is already meaningful and is the identity-initialised starting point)."""
        for head, x in ((self.image_head, image), (self.text_head, text)):
            mean = x.mean(dim=0)
            norm = (x - mean).norm(dim=1).mean().clamp(min=1e-6)
            head.set_input_stats(mean, float(1.0 / norm))

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_head(x)

    def embed_texts(self, x: torch.Tensor) -> torch.Tensor:
        return self.text_head(x)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Batch similarity matrix (images x texts)."""
        return self.embed_images(images) @ self.embed_texts(texts).T
