"""Decoding of raw member groups: the caption (UTF-8, size-bounded), the ``.json`` metadata (a strict JSON
object) and the image (safe decoders only, bounded in pixels from its header, converted to RGB).

Every `RawSample` from `bicro_clean.pipeline.tar_reader` becomes a `DecodedSample` or a `ReadIssue` with a reason
code from `REASONS`: nothing is dropped silently. The cheap checks (caption, metadata) run before the image is
decoded, so an unusable sample never costs an image decode. A `defer` predicate can leave images that pass every
header check undecoded, for a batched decoder (`bicro_clean.pipeline.device_decode`); `decode_image` is the CPU
decode it falls back to.
"""

from __future__ import annotations

import io
import unicodedata
import warnings
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode_budget import DecodeTimeout, decode_time_bound
from bicro_clean.pipeline.shards import (
    CAPTION_EXTENSION,
    IMAGE_EXTENSIONS,
    META_EXTENSION,
    SAFE_IMAGE_FORMATS,
    DecodedSample,
    RawSample,
    ReadIssue,
    describe_error,
    parse_meta,
    sample_ids,
)
from bicro_clean.pipeline.tar_reader import iter_shard


def _issue(raw: RawSample, reason: str, detail: str) -> ReadIssue:
    # url/uid from the .json when it parses, so error rows can be joined on them too
    return ReadIssue(raw.shard, raw.key, reason, detail, *sample_ids(raw.members))


def _decode_caption(raw: RawSample, config: ReaderConfig) -> str | ReadIssue:
    data = raw.members.get(CAPTION_EXTENSION)
    if data is None:
        return _issue(raw, "missing_caption", f"members: {sorted(raw.names.values())}")
    if len(data) > config.max_caption_bytes:  # checked on bytes, before decoding a possibly huge string
        return _issue(raw, "caption_too_long", f"{len(data)} bytes > max_caption_bytes={config.max_caption_bytes}")
    try:
        text = data.decode("utf-8-sig")  # a BOM is an encoding marker, not caption text
    except UnicodeDecodeError as error:
        return _issue(raw, "caption_not_utf8", str(error))
    text = text.strip()
    if not text:
        return _issue(raw, "empty_caption", f"{len(data)} bytes of whitespace")
    if not any(unicodedata.category(char)[0] in "LNPS" for char in text):
        # NULs, zero-width and format characters, a soft hyphen, lone combining marks: nothing a reader sees
        return _issue(raw, "empty_caption", f"{len(text)} characters, none visible: {ascii(text[:40])}")
    return text


def _decode_meta(raw: RawSample) -> dict | ReadIssue:
    data = raw.members.get(META_EXTENSION)
    if data is None:
        return {}
    try:
        meta = parse_meta(data)
    except (ValueError, RecursionError) as error:  # RecursionError: absurdly nested arrays
        return _issue(raw, "invalid_json", describe_error(error)[:300])
    if not isinstance(meta, dict):
        return _issue(raw, "invalid_json", f"top level is {type(meta).__name__}, not an object")
    return meta


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey ('I;16', 'I') scaled to 8 bits; PIL's own convert would clip everything above 255 to white."""
    values = np.asarray(image, dtype=np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _flatten(image: Image.Image) -> Image.Image:
    # transparent web images are drawn on white pages; dropping alpha instead would often give black
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    image.load()  # animated GIF/WebP: the first frame
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return _flatten(image)
    return image.convert("RGB")


EXIF_ORIENTATION = 0x0112


def _upright(image: Image.Image) -> Image.Image:
    """The photo as a viewer shows it: a camera's EXIF orientation (2-8) applied, so a photo stored sideways is
    embedded upright. Images without the tag (the common case) are returned as they are, not copied."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _reduce(image: Image.Image, min_side: int | None) -> None:
    """Ask a JPEG decoder for a 1/2, 1/4 or 1/8 scale decode in the DCT domain (libjpeg-turbo), the smallest whose
    both sides stay >= `min_side`, so an encoder that resizes the shorter side to `min_side` never upsamples.
    A 1600x1200 photo for a 224 encoder decodes at 400x300: ~1/16 of the pixel work. Other formats: no-op."""
    if min_side and image.format == "JPEG":
        image.draft(None, (min_side, min_side))  # mode None: keep the colour space; size: the lower bound


# (header-opened image, its bytes) -> True: leave it undecoded for a batched decoder (pipeline.device_decode)
Defer = Callable[[Image.Image, bytes], bool]


def _decode_image(raw: RawSample, extension: str, config: ReaderConfig, min_side: int | None = None,
                  defer: Defer | None = None) -> tuple[Image.Image | None, int, int] | ReadIssue:
    # PIL's own bomb bound follows the config, so raising reader.max_image_pixels for a trusted source really
    # raises it (PIL would otherwise refuse > 2 x 89M pixels whatever the config says). One run, one config.
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    try:
        with warnings.catch_warnings():
            # our own bound decides below; PIL's warning fires at the same bound
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw.members[extension]), formats=SAFE_IMAGE_FORMATS) as image:
                width, height = image.size  # header only: no pixel is decoded before this check
                if width * height > config.max_image_pixels:
                    detail = f"header says {width}x{height} > max_image_pixels={config.max_image_pixels}"
                    return _issue(raw, "image_too_large", detail)
                if max(width, height) > config.max_aspect_ratio * max(min(width, height), 1):
                    detail = f"header says {width}x{height}: aspect ratio > max_aspect_ratio={config.max_aspect_ratio:g}"
                    return _issue(raw, "image_aspect_ratio", detail)
                if defer is not None and defer(image, raw.members[extension]):
                    return None, width, height  # every header check passed; no pixel decoded here
                _reduce(image, min_side)  # after the bound check: width/height stay the header's, as recorded
                with decode_time_bound(config.max_decode_seconds):
                    return _to_rgb(_upright(image)), width, height
    except DecodeTimeout:
        return _issue(raw, "decode_timeout", f"decoding took over max_decode_seconds={config.max_decode_seconds:g}")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return _issue(raw, "image_too_large", describe_error(error))
    except Exception as error:  # untrusted bytes: PIL raises OSError, SyntaxError, ValueError, struct.error...
        return _issue(raw, "decode_error", f"{raw.names[extension]!r}: {describe_error(error)}"[:500])


def decode_image(raw: RawSample, extension: str, config: ReaderConfig,
                 min_side: int | None = None) -> tuple[Image.Image, int, int] | ReadIssue:
    """The image part of `decode_sample` alone (RGB image, header width, height), with its bounds and reason
    codes: what a batched decoder falls back to for an image it refuses."""
    return _decode_image(raw, extension, config, min_side)  # type: ignore[return-value]  # no defer: never None


def _dotted_key_hint(raw: RawSample) -> str:
    # "v1.2.jpg" is key "v1" with extension "2.jpg" (the WebDataset rule every loader applies), so the image
    # is there but under an extension no loader reads as an image: say so instead of a bare missing_image
    if any("." in ext and ext.rpartition(".")[2] in IMAGE_EXTENSIONS for ext in raw.members):
        return "; the file name has a dot after the key, so the key ends at the first dot of the file name"
    return ""


def decode_sample(raw: RawSample, config: ReaderConfig, min_side: int | None = None,
                  defer: Defer | None = None) -> DecodedSample | ReadIssue:
    """Check caption and metadata first (cheap), then decode the image to RGB. `min_side`: the image is only
    needed with its shorter side >= min_side (a JPEG may then decode at a reduced scale; width/height stay the
    full size); None decodes every image at full size. An image for which `defer(header-opened image, bytes)` is
    true passes every header check but stays undecoded: the sample's `image` is None (its bytes are in `raw`)."""
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in raw.members), None)
    if extension is None:
        return _issue(raw, "missing_image", f"members: {sorted(raw.names.values())}{_dotted_key_hint(raw)}")
    caption = _decode_caption(raw, config)
    meta = _decode_meta(raw)
    for result in (caption, meta):
        if isinstance(result, ReadIssue):
            return result
    decoded = _decode_image(raw, extension, config, min_side, defer)
    if isinstance(decoded, ReadIssue):
        return decoded
    image, width, height = decoded
    return DecodedSample(raw.shard, raw.key, image, width, height, caption, meta, raw)


def read_shard(url: str, config: ReaderConfig, min_side: int | None = None,
               defer: Defer | None = None) -> Iterator[DecodedSample | ReadIssue]:
    """`iter_shard` + `decode_sample`: one DecodedSample or ReadIssue per member group, in shard order."""
    for item in iter_shard(url, config):
        yield decode_sample(item, config, min_side, defer) if isinstance(item, RawSample) else item
