"""A sample with a link, hardlink or device member is ONE issue row (issue 16, defect 8: 37 samples gave 47 rows,
a non_file_member row plus a missing_image row for the same key), whichever order the members come in."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import read_shard
from bicro_clean.pipeline.shards import ReadIssue


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 120, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _special(tar: tarfile.TarFile, name: str, kind: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "000.jpg"
    tar.addfile(info)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
@pytest.mark.parametrize("link_first", [True, False])
def test_each_sample_is_one_row(tmp_path: Path, kind: bytes, link_first: bool) -> None:
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        _file(tar, "000.jpg", _jpeg())
        _file(tar, "000.txt", b"a blue square")
        if link_first:
            _special(tar, "001.jpg", kind)
            _file(tar, "001.txt", b"a link, not a photo")
        else:
            _file(tar, "001.txt", b"a link, not a photo")
            _special(tar, "001.jpg", kind)
        _file(tar, "002.jpg", _jpeg())
        _file(tar, "002.txt", b"another blue square")
    rows = list(read_shard(str(shard), ReaderConfig()))
    assert Counter(row.key for row in rows) == {"000": 1, "001": 1, "002": 1}
    issue = next(row for row in rows if row.key == "001")
    assert isinstance(issue, ReadIssue) and issue.reason == "non_file_member"
    assert "001.txt" in issue.detail


def test_a_link_with_no_other_member_is_still_recorded(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        _special(tar, "lonely.jpg", tarfile.SYMTYPE)
        _file(tar, "000.jpg", _jpeg())
        _file(tar, "000.txt", b"a blue square")
    rows = list(read_shard(str(shard), ReaderConfig()))
    assert [(row.key, getattr(row, "reason", "ok")) for row in rows] == [("lonely", "non_file_member"), ("000", "ok")]
