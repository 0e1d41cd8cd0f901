"""Thin images are refused from their header (issue 16, defect 1): a 1xN strip resized to the encoder's 224 px
shorter side would become 224 x 224N pixels (a 164-byte 1x20000 PNG took 4.7 GB and 21 s)."""

from __future__ import annotations

import io
import resource
import time

import pytest
from PIL import Image

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import decode_sample
from bicro_clean.pipeline.shards import REASONS, RawSample, ReadIssue


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _sample(image: bytes) -> RawSample:
    return RawSample("s.tar", "k", {"png": image, "txt": b"a red line"}, {"png": "k.png", "txt": "k.txt"})


@pytest.mark.parametrize("size", [(1, 20_000), (100_000, 1), (30, 1000)])
def test_thin_strips_get_their_own_reason_without_decoding(size: tuple[int, int]) -> None:
    data = _png(*size)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = decode_sample(_sample(data), ReaderConfig(), min_side=224)
    assert isinstance(result, ReadIssue) and result.reason == "image_aspect_ratio", result
    assert "image_aspect_ratio" in REASONS and f"{size[0]}x{size[1]}" in result.detail
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200_000  # KiB: nothing was blown up


def test_ordinary_and_panorama_shapes_still_decode() -> None:
    for size in ((500, 375), (3000, 400), (224, 224), (1, 1)):
        assert not isinstance(decode_sample(_sample(_png(*size)), ReaderConfig(), min_side=224), ReadIssue), size


def test_the_bound_is_configurable() -> None:
    wide = _sample(_png(2000, 50))
    assert isinstance(decode_sample(wide, ReaderConfig(), min_side=224), ReadIssue)
    assert not isinstance(decode_sample(wide, ReaderConfig(max_aspect_ratio=50), min_side=224), ReadIssue)
