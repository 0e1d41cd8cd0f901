"""Caption tokenisation that runs in DataLoader workers, apart from the text model that runs in the main process.

`SentenceTokens` is the first half of `SentenceTransformer.encode` (length sort, batches, `preprocess`),
`sentence_embeddings` the second half (forward, unsort), so `sentence_embeddings(model, SentenceTokens(model)(t))`
is exactly `model.encode(t, batch_size, convert_to_tensor=True)`, bit for bit (tests/models/test_encoders.py
checks it against `encode` itself). Under fork the worker reuses the model's tokenizer in place; pickled (spawn,
forkserver), only the model's local folder travels and the worker loads its own copy on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TextTokens:
    """Tokenised captions: the length-sorted order and one feature dict per model batch."""

    order: np.ndarray
    batches: list[dict[str, Any]]


class SentenceTokens:
    """Picklable tokeniser of a sentence-transformers model (worker side of `SentenceTransformer.encode`)."""

    def __init__(self, model: Any, path: str, batch_size: int) -> None:
        self.model, self.path, self.batch_size = model, path, batch_size

    def __getstate__(self) -> dict[str, Any]:
        return {"model": None, "path": self.path, "batch_size": self.batch_size}  # never the weights

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _model(self) -> Any:
        if self.model is None:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(self.path, device="cpu", local_files_only=True)
        return self.model

    def __call__(self, texts: list[str]) -> TextTokens:
        model = self._model()
        order = np.argsort([-model._input_length(text) for text in texts])
        if model._can_flatten_inputs():
            order = model._interleave_sorted_indices(order)
        ordered = [texts[i] for i in order]
        prompt = model._resolve_prompt(None, None)
        batches = [model.preprocess(ordered[s : s + self.batch_size], prompt=prompt)
                   for s in range(0, len(ordered), self.batch_size)]
        return TextTokens(np.asarray(order), batches)


@torch.inference_mode()
def sentence_embeddings(model: Any, tokens: TextTokens) -> torch.Tensor:
    """Main-process side: the model on each batch, rows back in caption order (float32, not normalised)."""
    from sentence_transformers.util import batch_to_device

    device = model._resolve_inference_device(None)
    model.eval()
    rows: list[torch.Tensor] = []
    for features in tokens.batches:
        rows.extend(model(batch_to_device(features, device))["sentence_embedding"])
    return torch.stack([rows[i] for i in np.argsort(tokens.order)])
