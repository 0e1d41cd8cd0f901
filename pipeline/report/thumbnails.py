"""Thumbnails of the gallery rows and their nearest anchors, cut while streaming only the shards that hold them,
as base64 JPEG data URIs; and the manifest lookups that resolve anchor keys to those shards. Each sample shown is
checked against the member digest its embeddings recorded: a changed input stops the report instead of showing
images and captions the scores were not computed from (pipeline/content_id.py).
"""

from __future__ import annotations

import base64
import io
import logging
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.content_id import SampleCheck
from bicro_clean.pipeline.layout import embedding_path
from bicro_clean.pipeline.shards import IMAGE_EXTENSIONS, SAFE_IMAGE_FORMATS, RawSample, shard_id
from bicro_clean.pipeline.tar_reader import iter_shard

logger = logging.getLogger(__name__)

THUMB_PX = 128
SMALL_PX = 72  # the threshold slider's example pairs: many of them, shown small


def shards_by_id(manifest: dict[str, Any]) -> dict[str, str]:
    """shard_id -> input URL, to resolve anchor keys (`<shard_id>/<key>`) to the shard holding the anchor."""
    return {shard_id(i["url"]): i["url"] for i in manifest.get("inputs", [])}


def split_pair_key(pair: str) -> tuple[str, str]:
    """`<shard_id>/<key>` (pipeline.score.pair_key) -> (shard_id, key); shard ids never contain '/'."""
    sid, _, key = pair.partition("/")
    return sid, key


@dataclass(frozen=True)
class Thumb:
    """One image as the galleries show it, with the caption stored next to it in the shard."""

    uri: str | None  # data URI, None when the image cannot be shown
    caption: str


def shard_urls(manifest: dict[str, Any], picks: dict[str, list[dict[str, Any]]]) -> dict[str, set[str]]:
    """Shard URL -> keys to fetch: every gallery row and its two nearest anchors."""
    by_id = shards_by_id(manifest)
    wanted: dict[str, set[str]] = {}
    for row in (r for rows in picks.values() for r in rows):
        wanted.setdefault(row["shard"], set()).add(row["key"])
        for anchor in (row.get("anchor_key_i2t"), row.get("anchor_key_t2i")):
            sid, key = split_pair_key(anchor) if anchor else (None, None)
            if sid in by_id:
                wanted.setdefault(by_id[sid], set()).add(key)
    return wanted


def thumbnail_uri(data: bytes, max_pixels: int, size: int = THUMB_PX) -> str | None:
    """A small JPEG re-encode for the report only (the cleaned shards keep the original bytes)."""
    try:
        with Image.open(io.BytesIO(data), formats=SAFE_IMAGE_FORMATS) as image:
            if image.width * image.height > max_pixels:
                return None
            image.draft("RGB", (size * 2, size * 2))  # JPEG: decode at reduced scale, far less memory
            small = image.convert("RGB")
            small.thumbnail((size, size), Image.Resampling.LANCZOS)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        logger.debug("report: no thumbnail: %s", error)
        return None
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=82 if size >= THUMB_PX else 74)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_thumb(sample: RawSample, max_pixels: int, size: int = THUMB_PX) -> Thumb:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
    uri = thumbnail_uri(sample.members[ext], max_pixels, size) if ext else None
    caption = sample.members.get("txt", b"").decode("utf-8", errors="replace").strip()
    return Thumb(uri, caption)


def fetch_thumbnails(wanted: dict[str, set[str]], config: CleanConfig,
                     small: dict[str, set[str]] | None = None) -> dict[tuple[str, str], Thumb]:
    """Stream each needed shard once, stopping as soon as its wanted keys are found. Keys only in `small`
    (shard URL -> keys) are cut at SMALL_PX."""
    small = small or {}
    found: dict[tuple[str, str], Thumb] = {}
    for url in sorted(set(wanted) | set(small)):
        full = wanted.get(url, set())
        missing = full | small.get(url, set())
        check = SampleCheck(url, embedding_path(config.output, url), required=False)  # a change stops the report
        for item in iter_shard(url, config.reader):
            if isinstance(item, RawSample) and item.key in missing:
                check.verify_key(item)
                size = THUMB_PX if item.key in full else SMALL_PX
                found[(url, item.key)] = sample_thumb(item, config.reader.max_image_pixels, size)
                missing.discard(item.key)
            if not missing:
                break
        if missing:
            logger.warning("report: %d samples not found in %s", len(missing), url)
    return found


JPEG_URI = "data:image/jpeg;base64,"  # what thumbnail_uri makes
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def shown_uri(thumb: Thumb | None) -> str | None:
    """The thumbnail's URI when it is a base64 JPEG data URI (thumbnail_uri's re-encode), else None: the page
    embeds no other kind of URI, since an SVG or HTML data URI, or any other URL, can carry script."""
    uri = thumb.uri if thumb is not None else None
    if uri is None or not uri.startswith(JPEG_URI) or not _BASE64.fullmatch(uri[len(JPEG_URI):]):
        return None
    return uri
