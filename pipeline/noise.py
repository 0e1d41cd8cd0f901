"""Caption-level synthetic noise, the protocol of the noisy-correspondence literature (NCR, BiCro).

Pick floor(R*N) captions at random and permute their image assignments among themselves. A plain random
permutation can hand a caption back its own image (or the image of a caption of the same photo), which would
make the realised noise rate lower than asked. We repair those fixed points by swapping, so exactly
floor(R*N) captions end up paired with an image that is not theirs and the noise rate is exact.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)


def noisy_count(n: int, rate: float) -> int:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    return int(math.floor(rate * n + 1e-9))


def caption_noise(true_image: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Return the image assigned to each caption after corrupting floor(rate*N) of them."""
    true_image = np.asarray(true_image, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(true_image), size=noisy_count(len(true_image), rate), replace=False)
    return shuffle_images(true_image, chosen, rng)


def shuffle_images(true_image: np.ndarray, chosen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute the images of the `chosen` captions among themselves, no caption keeping its own image (unless
    fewer than two are chosen). Shared by `caption_noise` and the noise plan of pipeline/noise_kinds.py, so
    the same seed gives the same shuffle in both."""
    chosen = np.sort(chosen)
    assigned = true_image.copy()
    if len(chosen) < 2:
        return assigned
    images = true_image[chosen][rng.permutation(len(chosen))]
    _repair_fixed_points(images, true_image[chosen], rng)
    assigned[chosen] = images
    return assigned


def _repair_fixed_points(images: np.ndarray, own: np.ndarray, rng: np.random.Generator) -> None:
    """Swap away every position whose image equals its own, in place, keeping the multiset of images."""
    for _ in range(100):
        bad = np.flatnonzero(images == own)
        if len(bad) == 0:
            return
        for i in bad:
            # a partner j accepts images[i] and gives i something that is not i's own image
            candidates = np.flatnonzero((images != own[i]) & (own != images[i]))
            if len(candidates):
                j = rng.choice(candidates)
                images[i], images[j] = images[j], images[i]
    if np.any(images == own):
        raise ValueError("cannot corrupt these captions: too few distinct images among the chosen ones")
