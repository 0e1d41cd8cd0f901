"""The encoder spec grammar, defined once: what `embed.encoder` may say, parsed and checked without loading a model.

The config (pipeline.config) checks a spec with `check_encoder_spec` when it is built, so a typo or a missing
checkpoint is a one-line config error before any work; models.encoders loads an encoder from the same
`parse_encoder_spec`. Grammar:

- ``towers`` or ``towers:IMAGE:TEXT``: IMAGE is empty, ``efficientnet-lite0`` or ``timm/NAME=/path/to/checkpoint``;
  TEXT (everything after the second colon) is empty, ``minilm`` or a local sentence-transformers folder.
- ``open_clip:MODEL`` or ``open_clip:MODEL:TAG_OR_PATH``: MODEL one of open_clip.list_models(); TAG_OR_PATH a
  pretrained tag open_clip knows for MODEL (downloaded when the encoder loads) or a local checkpoint file; empty
  means random weights.
- ``tiny``: a tiny randomly initialised open_clip model, for tests.

Kept free of torch at import: the CLI checks specs before anything heavy loads; open_clip and timm are imported
only to check a spec that names one of their models.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

KINDS = ("towers", "open_clip", "tiny")
GRAMMAR = "towers, towers:IMAGE:TEXT, open_clip:MODEL:TAG_OR_PATH or tiny"
IMAGE_TOWERS = ("efficientnet-lite0",)
TEXT_TOWERS = ("minilm",)
TINY_MODEL_NAME = "bicro-tiny"  # the open_clip config `tiny` registers (models.encoders)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class EncoderSpecError(ValueError):
    """An encoder spec that no encoder can be loaded from; the message is one line."""


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed spec. towers: `image`, `text` ("" = the default tower); open_clip: `model`, `pretrained` (a tag or a
    checkpoint path, "" = random weights)."""

    kind: Literal["towers", "open_clip", "tiny"]
    image: str = ""
    text: str = ""
    model: str = ""
    pretrained: str = ""

    @property
    def aligned(self) -> bool:
        """Image and text embeddings in one space (open_clip, tiny); the towers are trained apart."""
        return self.kind != "towers"

    @property
    def timm(self) -> tuple[str, str] | None:
        """(NAME, checkpoint) of a ``timm/NAME=checkpoint`` image tower, else None."""
        if not self.image.startswith("timm/"):
            return None
        name, _, checkpoint = self.image[len("timm/"):].partition("=")
        return name, checkpoint


def _unknown_kind(spec: str) -> EncoderSpecError:
    kind = spec.split(":", 1)[0]
    close = difflib.get_close_matches(kind, KINDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return EncoderSpecError(f"unknown encoder {spec!r}{hint}: use {GRAMMAR}")


def _towers(spec: str) -> EncoderSpec:
    parts = spec.split(":", 2)
    image, text = (parts + ["", ""])[1:3]
    if image and image not in IMAGE_TOWERS:
        name, equals, checkpoint = image[len("timm/"):].partition("=")
        if not (image.startswith("timm/") and name and equals and checkpoint):
            raise EncoderSpecError(f"unknown image tower {image!r} in {spec!r}: use efficientnet-lite0 or "
                                   "timm/NAME=/path/to/checkpoint")
    return EncoderSpec("towers", image=image, text=text)


def parse_encoder_spec(spec: str) -> EncoderSpec:
    """The parts of `spec`; syntax only (no file or model name is looked up). Raises EncoderSpecError."""
    if not isinstance(spec, str) or not spec.strip():
        raise EncoderSpecError(f"empty encoder spec: use {GRAMMAR}")
    kind = spec.split(":", 1)[0]
    if kind == "towers":
        return _towers(spec)
    if kind == "tiny":
        if spec != "tiny":
            raise EncoderSpecError(f"encoder {spec!r}: tiny takes no arguments")
        return EncoderSpec("tiny")
    if kind == "open_clip":
        _, model, pretrained = (spec.split(":", 2) + ["", ""])[:3]
        if not model:
            raise EncoderSpecError(f"encoder {spec!r}: use open_clip:MODEL or open_clip:MODEL:TAG_OR_PATH")
        return EncoderSpec("open_clip", model=model, pretrained=pretrained)
    raise _unknown_kind(spec)


def looks_like_path(value: str) -> bool:
    """A TAG_OR_PATH that can only be meant as a file (a tag has neither slashes nor a checkpoint suffix)."""
    return "/" in value or value.endswith(CHECKPOINT_SUFFIXES)


def _check_towers(spec: EncoderSpec) -> None:
    timm_tower = spec.timm
    if timm_tower is not None:
        name, checkpoint = timm_tower
        if not Path(checkpoint).is_file():
            raise EncoderSpecError(f"timm checkpoint {checkpoint} does not exist")
        import timm  # only for a spec that names a timm model

        if not timm.is_model(name):
            raise EncoderSpecError(f"timm has no model {name!r}")
    if spec.text and spec.text not in TEXT_TOWERS and not Path(spec.text).is_dir():
        raise EncoderSpecError(f"text tower {spec.text!r} is not minilm or a local sentence-transformers directory")


def _check_open_clip(spec: EncoderSpec) -> None:
    import open_clip  # only for a spec that names an open_clip model; lists bundled configs, downloads nothing

    model = spec.model.replace("/", "-")  # open_clip's own spelling: ViT-B/32 is ViT-B-32
    models = open_clip.list_models()
    if model not in models and model != TINY_MODEL_NAME:
        close = difflib.get_close_matches(model, models, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EncoderSpecError(f"open_clip has no model {spec.model!r}{hint}")
    tag = spec.pretrained
    if not tag or Path(tag).is_file() or (not looks_like_path(tag) and open_clip.get_pretrained_cfg(model, tag)):
        return
    if looks_like_path(tag):
        raise EncoderSpecError(f"open_clip checkpoint {tag} does not exist")
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
    raise EncoderSpecError(f"open_clip model {spec.model!r} has no pretrained tag {tag!r} and no file {tag!r} "
                           f"exists (its tags: {tags})")


def check_encoder_spec(spec: str) -> EncoderSpec:
    """Parse `spec` and check what can be checked without loading weights: tower names, model names, pretrained
    tags and that local checkpoints and folders exist. Raises EncoderSpecError with a one-line message."""
    parsed = parse_encoder_spec(spec)
    if parsed.kind == "towers":
        _check_towers(parsed)
    elif parsed.kind == "open_clip":
        _check_open_clip(parsed)
    return parsed
