"""Reduced-size JPEG decode (libjpeg-turbo DCT scaling): big JPEGs decode at 1/2, 1/4 or 1/8 scale, never below
what the encoder's transform needs; reason codes, recorded sizes and the size bounds are unchanged."""

import io

import numpy as np
import pytest
from PIL import Image

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import decode_sample
from bicro_clean.pipeline.shards import DecodedSample, RawSample, ReadIssue


def _jpeg(size, mode="RGB", **save):
    rng = np.random.default_rng(size)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BICUBIC).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def _raw(data, ext="jpg"):
    return RawSample("s.tar", "k", {ext: data, "txt": b"a caption"}, {ext: f"k.{ext}", "txt": "k.txt"})


@pytest.mark.parametrize("size, decoded", [((1600, 1200), (400, 300)), ((500, 375), (500, 375)),
                                           ((448, 448), (224, 224)), ((3000, 449), (1500, 225)),
                                           ((224, 1791), (224, 1791)), ((1793, 1795), (225, 225)),
                                           ((4000, 3000), (500, 375))])
def test_jpeg_decodes_at_the_smallest_scale_that_keeps_the_shorter_side(size, decoded):
    sample = decode_sample(_raw(_jpeg(size)), ReaderConfig(), min_side=224)
    assert isinstance(sample, DecodedSample) and sample.image.mode == "RGB"
    assert sample.image.size == decoded and min(decoded) >= 224
    assert (sample.width, sample.height) == size  # what the row records: the header's full size


def test_small_images_and_other_formats_decode_exactly_as_before():
    small = _raw(_jpeg((500, 375)))
    png = io.BytesIO()
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(png, format="PNG")
    for raw in (small, _raw(png.getvalue(), "png")):
        full, reduced = decode_sample(raw, ReaderConfig()), decode_sample(raw, ReaderConfig(), min_side=224)
        assert np.array_equal(np.asarray(full.image), np.asarray(reduced.image))


def test_reduced_pixels_stay_close_to_a_full_decode_after_the_transform():
    from bicro_clean.models.encoders import ImageTransform

    raw, transform = _raw(_jpeg((1600, 1200))), ImageTransform(224)
    full = transform(decode_sample(raw, ReaderConfig()).image)
    reduced = transform(decode_sample(raw, ReaderConfig(), min_side=224).image)
    assert full.shape == reduced.shape == (3, 224, 224)
    assert float((full - reduced).abs().mean()) < 0.03  # normalised units (~1/255 of a pixel level)


@pytest.mark.parametrize("mode, save", [("L", {}), ("CMYK", {}), ("RGB", {"progressive": True}),
                                        ("RGB", {"subsampling": 0})])
def test_grey_cmyk_and_progressive_jpegs_come_out_rgb(mode, save):
    sample = decode_sample(_raw(_jpeg((1000, 800), mode, **save)), ReaderConfig(), min_side=224)
    assert sample.image.mode == "RGB" and sample.image.size == (500, 400)  # 800 // 224 = 3: scale 1/2


def test_size_bounds_and_reason_codes_are_unchanged():
    big = _raw(_jpeg((1600, 1200)))
    for config in (ReaderConfig(max_image_pixels=1_000_000), ReaderConfig(max_image_pixels=900_000)):
        for side in (None, 224):
            issue = decode_sample(big, config, min_side=side)
            assert isinstance(issue, ReadIssue) and issue.reason == "image_too_large"
            assert issue.detail == decode_sample(big, config).detail
    truncated = _raw(_jpeg((1600, 1200))[:2000])
    full, reduced = decode_sample(truncated, ReaderConfig()), decode_sample(truncated, ReaderConfig(), min_side=224)
    assert isinstance(full, ReadIssue) and (full.reason, full.detail) == (reduced.reason, reduced.detail)
    assert full.reason == "decode_error"
