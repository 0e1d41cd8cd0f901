"""Shared fixtures: tiny synthetic images and tar shards with arbitrary (also broken) members."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

import psutil
import pytest
from PIL import Image
from pydantic import BaseModel

if TYPE_CHECKING:
    from bicro_clean.pipeline.config import CleanConfig

# A member is (name, bytes) for a regular file, or a ready TarInfo (directory, symlink, device...) without data.
Member = Union[tuple[str, bytes], tarfile.TarInfo]


def _regular(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)  # written as given: absolute and '..' names survive, unlike TarFile.add
    info.size, info.mtime = size, 0
    return info


def tar_bytes(members: list[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                tar.addfile(_regular(name, len(data)), io.BytesIO(data))
    return buffer.getvalue()


def header_offsets(data: bytes) -> dict[str, int]:
    """Member name -> byte offset of its header in an uncompressed tar (to cut or corrupt there)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {info.name: info.offset for info in tar.getmembers()}


def image_bytes(fmt: str = "PNG", mode: str = "RGB", size: tuple[int, int] = (16, 16), color=None, **save) -> bytes:
    if color is None:
        color = {"RGB": (200, 30, 30), "CMYK": (0, 200, 200, 0), "RGBA": (200, 30, 30, 128)}.get(mode, 100)
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **save)
    return buffer.getvalue()


class ShardFactory:
    """Writes tar shards under a temp folder; `write` takes members or raw (possibly broken) tar bytes."""

    tar_bytes = staticmethod(tar_bytes)
    header_offsets = staticmethod(header_offsets)

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, name: str, content: list[Member] | bytes, gzip_level: int | None = None) -> Path:
        data = content if isinstance(content, bytes) else tar_bytes(content)
        if gzip_level is not None:
            data = gzip.compress(data, compresslevel=gzip_level, mtime=0)
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


@pytest.fixture
def shards(tmp_path: Path) -> ShardFactory:
    return ShardFactory(tmp_path / "shards")


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    return image_bytes


@pytest.fixture
def good_sample(make_image) -> Callable[[str], list[Member]]:
    """The members of one valid sample: KEY.jpg + KEY.txt."""

    def members(key: str, caption: bytes = b"a red square") -> list[Member]:
        return [(f"{key}.jpg", make_image("JPEG")), (f"{key}.txt", caption)]

    return members


def _extra_shard(path: Path) -> None:
    """A key that 00000.tar also has (must be renamed), an undecodable image, a sample without caption."""
    red, blue = image_bytes("PNG", color="red"), image_bytes("PNG", color="blue")
    members = [("000000000.png", red), ("000000000.txt", b"a red square"),
               ("bad.jpg", b"<html>not an image</html>"), ("bad.txt", b"broken"), ("nocap.png", blue)]
    path.write_bytes(tar_bytes(members))


# The BiCro settings every whole-run test uses: small enough for seconds on 2 cores, every stage still real.
TINY_BICRO = {"embed_dim": 16, "hidden_dim": 32, "epochs": 2, "warmup_epochs": 1, "batch_size": 8}
TINY_EMBED = {"encoder": "tiny", "num_workers": 0, "batch_size": 8, "progress": False}


def tiny_config(input: str | list[str], output: str | Path, **sections: dict) -> "CleanConfig":
    """A CleanConfig with the tiny encoder (no decode workers, no progress bar) and TINY_BICRO; `sections`
    (e.g. select={"keep_fraction": 0.5}) are merged over those defaults section by section."""
    from bicro_clean.pipeline.config import CleanConfig

    base = {"embed": TINY_EMBED, "bicro": TINY_BICRO}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return CleanConfig.model_validate({"input": input, "output": str(output), **base})


def image_folder(root: Path, images: int, size: tuple[int, int], captions: Callable[[int], list[str]],
                 ext: str = "png") -> tuple[Path, Path]:
    """`root/images/im<i>.<ext>` (distinct colours) + `root/captions.csv`: the make-shards input layout."""
    import csv

    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for i in range(images):
            name = f"im{i}.{ext}"
            Image.new("RGB", size, (30 * i % 256, (255 - 30 * i) % 256, 70 * i % 256)).save(root / "images" / name)
            writer.writerows([name, caption] for caption in captions(i))
    return root / "images", root / "captions.csv"


def numbered_shards(root: Path, images: int, size: tuple[int, int], shard_size: int) -> Path:
    """`root/shards`: make_shards of `images` plain images x 2 captions ("a picture number i", "colour i"), 25%
    caption noise (its truth in each KEY.json)."""
    from bicro_clean.pipeline.make_shards import make_shards

    folder, captions = image_folder(root, images, size, lambda i: [f"a picture number {i}", f"colour {i}"])
    make_shards(folder, captions, root / "shards", shard_size=shard_size, noise_rate=0.25)
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """3 make_shards shards (8 images x 2 captions, 25% caption noise) + one shard with broken samples."""
    shards = numbered_shards(tmp_path_factory.mktemp("tiny-data"), 8, (16, 16), shard_size=6)
    _extra_shard(shards / "extra.tar")
    return shards


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of session `sid` (a run or server started in its own session), zombies aside."""
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (psutil.Error, OSError):  # gone or not ours to inspect
            continue
    return alive


def config_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf field of a config model, dotted (`embed.encoder`), excluded ones included."""
    out = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= config_fields(field.annotation, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out
