"""EXIF orientation (issue 16, defect 14): a photo stored sideways with an orientation tag is embedded the way a
viewer shows it. The recorded width/height stay the stored (header) size; the batched device decoder, which
ignores EXIF, leaves such photos to the CPU path."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import decode_sample
from bicro_clean.pipeline.device_decode import batchable_jpeg
from bicro_clean.pipeline.shards import RawSample


def _upright_photo() -> Image.Image:
    pixels = np.zeros((60, 40, 3), dtype=np.uint8)  # portrait: 40 wide, 60 tall
    pixels[:20] = (255, 0, 0)  # red at the top
    pixels[20:] = (0, 0, 255)
    return Image.fromarray(pixels)


def _jpeg(image: Image.Image, orientation: int | None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def _decode(data: bytes):
    raw = RawSample("s.tar", "k", {"jpg": data, "txt": b"a red roof"}, {"jpg": "k.jpg", "txt": "k.txt"})
    return decode_sample(raw, ReaderConfig())


def test_a_photo_stored_sideways_is_embedded_upright() -> None:
    stored = _upright_photo().rotate(90, expand=True)  # turned left (counter-clockwise), as a camera may store it
    sample = _decode(_jpeg(stored, orientation=6))  # 6: turn 90 degrees clockwise to view (stored turned left)
    assert (sample.width, sample.height) == (60, 40)  # the stored size, as recorded
    upright = np.asarray(sample.image)
    assert upright.shape[:2] == (60, 40)
    assert upright[5, 20, 0] > 200 and upright[5, 20, 2] < 60  # red at the top again
    assert upright[55, 20, 2] > 200


def test_untagged_and_normal_photos_are_unchanged() -> None:
    for orientation in (None, 1):
        sample = _decode(_jpeg(_upright_photo(), orientation))
        assert np.asarray(sample.image).shape[:2] == (60, 40)
        assert np.asarray(sample.image)[5, 20, 0] > 200


def test_the_device_decoder_leaves_rotated_photos_to_pil() -> None:
    for orientation, batchable in ((None, True), (1, True), (6, False), (3, False)):
        data = _jpeg(_upright_photo(), orientation)
        with Image.open(io.BytesIO(data)) as image:
            assert batchable_jpeg(image, data) is batchable, orientation
