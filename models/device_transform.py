"""Tensor versions of the encoders' PIL image transforms, so decoded images can be resized on the GPU.

The embed stage's batched JPEG decoder (`bicro_clean.pipeline.device_decode`) gets uint8 RGB tensors straight from
`torchvision.io.decode_jpeg` on the encoder's device; sending them back to PIL would undo the point of decoding
there. `tensor_transform` reads an encoder's `image_transform()` (our `ImageTransform`, or a torchvision
`Compose` of Resize / CenterCrop / convert-to-RGB / ToTensor / Normalize, as open_clip builds) and returns the
same steps on tensors: the shorter-side resize with antialiasing (what PIL always does), the centre crop, the
uint8 rounding PIL's resize output gets, the 1/255 scaling and the normalisation. Any other step has no
equivalent here and gives None: the caller then keeps the CPU path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import functional as TF

from bicro_clean.models.encoders import ImageTransform

logger = logging.getLogger(__name__)

# A step: ("resize", (size, interpolation, max_size)), ("crop", [h, w]), ("scale", None) or ("normalize", (mean, std))
Step = tuple[str, Any]
_RGB_STEPS = ("MaybeConvertMode", "_convert_to_rgb")  # PIL convert("RGB"): decode_jpeg already gives RGB


@dataclass(frozen=True)
class TensorTransform:
    """The PIL transform's steps on a (3, H, W) uint8 RGB tensor, on whatever device the tensor is."""

    steps: tuple[Step, ...]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float()
        in_uint8_range = True  # before ToTensor PIL works on uint8 images: every resize output is rounded
        for kind, args in self.steps:
            if kind == "resize":
                size, interpolation, max_size = args
                x = TF.resize(x, size, interpolation=interpolation, max_size=max_size, antialias=True)
                if in_uint8_range:
                    x = x.clamp_(0, 255).round_()
            elif kind == "crop":
                x = TF.center_crop(x, args)
            elif kind == "scale":
                x, in_uint8_range = x / 255.0, False
            else:
                x = TF.normalize(x, *args)
        return x

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Each image transformed (sizes differ before the crop), stacked: (N, 3, S, S)."""
        return torch.stack([self(image) for image in images])


def _step(step: Any) -> list[Step] | None:
    """One torchvision transform as tensor steps; None when it has no equivalent here."""
    from torchvision import transforms as T

    name = getattr(step, "__name__", type(step).__name__)
    if isinstance(step, T.Resize):
        return [("resize", (step.size, step.interpolation, step.max_size))]
    if isinstance(step, T.CenterCrop):
        return [("crop", list(step.size))]
    if isinstance(step, T.ToTensor):  # open_clip's MaybeToTensor subclasses it
        return [("scale", None)]
    if isinstance(step, T.Normalize):
        return [("normalize", (list(step.mean), list(step.std)))]
    if name in _RGB_STEPS or getattr(getattr(step, "lambd", None), "__name__", "") in _RGB_STEPS:
        return []
    return None


def tensor_transform(transform: Any) -> TensorTransform | None:
    """The tensor equivalent of an encoder's image transform, or None when one step has none."""
    if isinstance(transform, ImageTransform):
        return TensorTransform((("resize", (transform.size, TF.InterpolationMode.BICUBIC, None)),
                                ("crop", [transform.size, transform.size]), ("scale", None),
                                ("normalize", (list(transform.mean), list(transform.std)))))
    steps: list[Step] = []
    for step in getattr(transform, "transforms", [transform]):
        converted = _step(step)
        if converted is None:
            logger.info("no tensor equivalent for transform step %r: JPEGs decode on the CPU", step)
            return None
        steps += converted
    if [kind for kind, _ in steps].count("scale") != 1:  # no ToTensor: not an image -> tensor pipeline
        return None
    return TensorTransform(tuple(steps))
