"""Batched JPEG decoding on the encoder's device for the embed stage (`embed.jpeg_decode`).

Why: with the encoder on a GPU, the embed stage is bound by PIL decoding JPEGs in the DataLoader workers, one
image at a time on the CPU cores. On the device path the workers only read the tar and check each sample (caption,
metadata, the image header and its `reader.max_image_pixels` bound: `decode.decode_sample` with
`defer=batchable_jpeg`), and ship the raw bytes of the JPEGs that qualify (`JpegBatch`). The main process decodes a
chunk's JPEGs in one `torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on CUDA, libjpeg on CPU) and
resizes, crops and normalises them there (`models.device_transform`), then interleaves them with the pixels the
workers decoded themselves (PNG, WebP, CMYK JPEGs...), in row order.

Whatever the device decoder refuses goes back to the CPU path for that sample: a failed batch is retried one image at
a time, and an image refused alone is decoded by `decode.decode_image` and the encoder's PIL transform, so its row
gets the CPU path's status, reason code and detail. A refused image's repeats in the same shard (same bytes, other
keys) get the same treatment, each with its own member name in the detail.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import torch
from PIL import Image

from bicro_clean.models.device_transform import TensorTransform, tensor_transform
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import decode_image
from bicro_clean.pipeline.shards import IMAGE_EXTENSIONS, DecodedSample, RawSample, ReadIssue

logger = logging.getLogger(__name__)

JpegPath = Literal["cpu", "device"]
_BATCHABLE_MODES = ("RGB", "L")  # CMYK/YCCK colour conversion differs between decoders: those stay on PIL
_EOI = b"\xff\xd9"


def batchable_jpeg(image: Image.Image, data: bytes) -> bool:
    """A header-opened image that the batched decoder takes: a JPEG in RGB/grey that ends with its EOI marker
    (a cut-off JPEG stays on PIL, which reports it as truncated). Picklable: it runs in the decode workers."""
    # a rotated photo (EXIF orientation 2-8) stays on PIL too, which turns it upright (nvJPEG ignores EXIF)
    return (image.format == "JPEG" and image.mode in _BATCHABLE_MODES and data.endswith(_EOI)
            and image.getexif().get(0x0112, 1) == 1)


def encoder_device(encoder: Any) -> torch.device:
    device = getattr(encoder, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def jpeg_path(setting: str, encoder: Any) -> JpegPath:
    """The effective decode path: auto = device when the encoder runs on CUDA and its image transform has a
    tensor equivalent, else cpu. An explicit "device" the transform cannot follow is an error, not a fallback."""
    if setting == "cpu":
        return "cpu"
    if setting == "auto" and encoder_device(encoder).type != "cuda":
        return "cpu"
    if tensor_transform(encoder.image_transform()) is None:
        if setting == "device":
            raise ValueError(f"embed.jpeg_decode=device: encoder {encoder.spec!r} has an image transform without "
                             "a tensor equivalent (models.device_transform); use jpeg_decode=cpu")
        return "cpu"
    return "device"


@dataclass
class JpegBatch:
    """A chunk's JPEGs left undecoded by the worker: every such ok row (repeats of an image included), its image
    member name, and where its bytes lie in `buffer` for the shard's first row with those bytes (None for
    repeats). One buffer per chunk: one shared-memory tensor from the worker, one pinned copy on CUDA."""

    rows: list[int] = field(default_factory=list)  # index into the chunk's rows
    names: list[str] = field(default_factory=list)
    spans: list[tuple[int, int] | None] = field(default_factory=list)  # (offset, length) in buffer
    buffer: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    parts: list[bytes] = field(default_factory=list, repr=False)  # the worker's bytes until `packed`

    def add(self, index: int, sample: DecodedSample, first: bool) -> None:
        extension = next(ext for ext in IMAGE_EXTENSIONS if ext in sample.raw.members)  # decode_sample's choice
        data = sample.raw.members[extension]
        self.rows.append(index)
        self.names.append(sample.raw.names[extension])
        if first:
            ends = [span[0] + span[1] for span in self.spans if span is not None]
            self.spans.append((ends[-1] if ends else 0, len(data)))
            self.parts.append(data)
        else:
            self.spans.append(None)

    def __len__(self) -> int:
        return len(self.rows)

    def packed(self) -> JpegBatch:
        """The bytes joined into `buffer` (what crosses to the main process)."""
        joined = torch.frombuffer(bytearray(b"".join(self.parts)), dtype=torch.uint8) if self.parts else self.buffer
        return replace(self, buffer=joined, parts=[])

    def data(self, i: int) -> torch.Tensor | None:
        """Entry i's bytes as a 1-D uint8 view of the buffer (decode_jpeg's input), None for a repeat."""
        span = self.spans[i]
        return None if span is None else self.buffer[span[0] : span[0] + span[1]]

    def pinned(self) -> JpegBatch:
        """Page-locked bytes (the DataLoader's pin thread, CUDA only), so host reads of them never page-fault."""
        return replace(self, buffer=self.buffer.pin_memory())


@dataclass
class TransformFailure:
    """The encoder's PIL transform raised on a decoded image (the CPU path's `transform:` decode_error)."""

    detail: str


Outcome = torch.Tensor | ReadIssue | TransformFailure


@dataclass
class DeviceDecoder:
    """Decodes JPEG bytes in batches on `device` and transforms them there; `fallback` is the CPU path."""

    device: torch.device
    transform: TensorTransform
    cpu_transform: Callable[[Image.Image], torch.Tensor]
    reader: ReaderConfig
    min_side: int | None = None
    refused: int = 0  # images the device decoder refused alone (sent to the CPU path)

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Pixels (3, S, S) on the device per JPEG, None where the decoder refused it. One batch call; if it
        fails, one call per image, so one bad image never costs the others."""
        if not data:
            return []
        try:
            return [self._pixels(image) for image in self._decode_jpeg(data)]
        except Exception as error:  # nvJPEG/libjpeg reject the whole batch for one bad image
            logger.debug("batched decode_jpeg of %d images failed (%s): one by one", len(data), error)
        return [self._one(d) for d in data]

    def _one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return self._pixels(self._decode_jpeg([data])[0])
        except Exception as error:
            self.refused += 1
            # the first one loudly: a decoder refusing everything (no nvJPEG, out of memory) makes a slow run
            (logger.warning if self.refused == 1 else logger.debug)(
                "decode_jpeg on %s refused an image, which takes the CPU path (%s)", self.device, error)
            return None

    def _decode_jpeg(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def _pixels(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(image)

    def fallback(self, shard: str, key: str, name: str, data: bytes) -> Outcome:
        """The CPU path for one image: PIL decode (reduced DCT scale, same bounds) + the encoder's PIL transform."""
        raw = RawSample(shard, key, {"jpg": data}, {"jpg": name})
        decoded = decode_image(raw, "jpg", self.reader, self.min_side)
        if isinstance(decoded, ReadIssue):
            return decoded
        try:
            return self.cpu_transform(decoded[0]).to(self.device)
        except Exception as error:  # as ShardStream: a transform failure is that sample's problem
            return TransformFailure(f"transform: {error}"[:500])


def device_decoder(encoder: Any, reader: ReaderConfig, min_side: int | None) -> DeviceDecoder:
    transform = tensor_transform(encoder.image_transform())
    if transform is None:
        raise ValueError(f"encoder {encoder.spec!r}: image transform without a tensor equivalent")
    return DeviceDecoder(encoder_device(encoder), transform, encoder.image_transform(), reader, min_side)


def _fail_row(rows: list[dict[str, Any]], index: int, outcome: ReadIssue | TransformFailure,
              issue_row: Callable[[ReadIssue], dict[str, Any]]) -> None:
    """The row the CPU path writes for this failure (the embed stage's `_row` of the issue, or the transform
    failure marked on the ok row)."""
    if isinstance(outcome, ReadIssue):
        ids = {name: rows[index].get(name) for name in ("url", "uid")}  # from the sample's .json, read in the worker
        rows[index] = issue_row(outcome)
        rows[index].update({name: value for name, value in ids.items() if rows[index].get(name) is None})
    else:
        rows[index].update(status="error", reason="decode_error", detail=outcome.detail, image_sha256=None)


def resolve_chunk(rows: list[dict[str, Any]], shard: str, jpegs: JpegBatch, cpu_pixels: torch.Tensor | None,
                  known: dict[str, Any], failed: dict[str, bytes], decoder: DeviceDecoder,
                  issue_row: Callable[[ReadIssue], dict[str, Any]]) -> torch.Tensor | None:
    """Decode a chunk's JPEGs and return the pixels of its ok rows whose image is new to the shard (not in
    `known`), in row order, as the CPU path's `Chunk.pixels` would be; refused images' rows are rewritten in place
    (`rows`). `failed` (per shard, updated): bytes of images the CPU path also failed on, for their repeats."""
    fresh = [i for i, span in enumerate(jpegs.spans) if span is not None]
    decoded = decoder.decode([jpegs.data(i) for i in fresh])
    images: dict[str, torch.Tensor] = {}
    for i, pixels in zip(fresh, decoded):
        row = rows[jpegs.rows[i]]
        if pixels is None:
            data = jpegs.data(i).numpy().tobytes()
            outcome = decoder.fallback(shard, row["key"], jpegs.names[i], data)
            if not isinstance(outcome, torch.Tensor):
                failed[row["image_sha256"]] = data  # its rows (this one too) are rewritten by _fail_repeats
                continue
            pixels = outcome
        images[row["image_sha256"]] = pixels
    _fail_repeats(rows, shard, jpegs, failed, decoder, issue_row)
    return _in_row_order(rows, images, known, cpu_pixels, decoder.device)


def _fail_repeats(rows: list[dict[str, Any]], shard: str, jpegs: JpegBatch, failed: dict[str, bytes],
                  decoder: DeviceDecoder, issue_row: Callable[[ReadIssue], dict[str, Any]]) -> None:
    """Every row whose image failed on the CPU path too gets that path's row, detail naming its own member."""
    for index, name in zip(jpegs.rows, jpegs.names):
        data = failed.get(rows[index]["image_sha256"])
        if data is not None:
            outcome = decoder.fallback(shard, rows[index]["key"], name, data)
            if isinstance(outcome, torch.Tensor):  # the CPU path is deterministic: never happens
                raise RuntimeError(f"{shard}: image of {rows[index]['key']!r} decoded on a second try")
            _fail_row(rows, index, outcome, issue_row)


def _in_row_order(rows: list[dict[str, Any]], images: dict[str, torch.Tensor], known: dict[str, Any],
                  cpu_pixels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Device-decoded images and the worker's CPU pixels merged in the order of the rows' first new digests."""
    cpu = list(cpu_pixels.to(device, non_blocking=True)) if cpu_pixels is not None else []
    new = dict.fromkeys(r["image_sha256"] for r in rows if r["status"] == "ok" and r["image_sha256"] not in known)
    if len(new) - len(images) != len(cpu):  # worker and main process disagree on the new images: never guess
        raise RuntimeError(f"{len(cpu)} CPU-decoded images for {len(new) - len(images)} new non-batched images")
    cpu.reverse()
    ordered = [images[digest] if digest in images else cpu.pop() for digest in new]
    return torch.stack(ordered) if ordered else None
