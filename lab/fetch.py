"""`bicro-clean fetch flickr8k --out DIR`: download the Flickr8k benchmark and convert it to our data layout.

For users with internet (the demo itself never needs it). Flickr8k (Hodosh, Young and Hockenmaier, JAIR 2013;
research use only, the photos keep their Flickr owners' licences) is distributed as two archives; the commonly used
public mirror is Jason Brownlee's GitHub release `jbrownlee/Datasets`, tag `Flickr8k`:
  Flickr8k_Dataset.zip  ~1 GB, ``Flicker8k_Dataset/<name>.jpg`` (8,091 photos; sic "Flicker")
  Flickr8k_text.zip     ~2 MB, ``Flickr8k.token.txt`` (``<name>.jpg#<i>\\t<caption>``, 5 per photo) and
                        ``Flickr_8k.{train,dev,test}Images.txt`` (6,000 / 1,000 / 1,000 names)
Every archive is checked against the digests in `FLICKR8K` before anything is unpacked; a mismatch, or an
unreachable URL, is a one-line `FetchError` (the CLI exits 2). The table is a parameter, so tests serve their own
archives from a loopback HTTP server.

Output (what `bicro-clean demo --data DIR`, `make-shards` and `evaluate` read): ``DIR/images/<name>.jpg`` (the
original bytes), ``DIR/captions.csv`` (``image,caption``, the 5 captions of each photo in order) and
``DIR/splits.json`` (``{"train": [...], "dev": [...], "test": [...]}`` from the official split files).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

MIRROR = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"


@dataclass(frozen=True)
class Archive:
    """One file to download: its name, where from, and the digests it must have (hashlib name -> hex)."""

    name: str
    url: str
    digests: dict[str, str] = field(default_factory=dict)


# MD5s as published with these exact mirror URLs by the R torch ecosystem's Flickr8k dataset (mlverse torchvision,
# `flickr8k_caption_dataset`). TODO: add the SHA-256 of each archive (not obtainable from the offline development
# machine): `sha256sum Flickr8k_Dataset.zip Flickr8k_text.zip` on a verified download; every listed digest is checked.
FLICKR8K: tuple[Archive, ...] = (
    Archive("Flickr8k_Dataset.zip", f"{MIRROR}/Flickr8k_Dataset.zip", {"md5": "f18a1e2920de5bd84dae7cf08ec78978"}),
    Archive("Flickr8k_text.zip", f"{MIRROR}/Flickr8k_text.zip", {"md5": "bf6c1abcb8e4a833b7f922104de18627"}),
)
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
CHUNK = 1 << 20


class FetchError(Exception):
    """A download or check that failed; its message is one line for the user."""


def archives_from_json(path: str | Path) -> tuple[Archive, ...]:
    """A table like `FLICKR8K` from JSON ``[{"name", "url", "digests": {"sha256": hex}}]`` (tests, other mirrors)."""
    try:
        return tuple(Archive(a["name"], a["url"], dict(a["digests"])) for a in json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise FetchError(f"bad sources file {path}: {error}") from None


def _digests(path: Path, names: list[str]) -> dict[str, str]:
    hashes = {name: hashlib.new(name) for name in names}
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


def _check(archive: Archive, path: Path) -> None:
    for name, got in _digests(path, sorted(archive.digests)).items():
        if got != archive.digests[name].lower():
            raise FetchError(f"{archive.name}: {name} mismatch: got {got}, expected {archive.digests[name]} "
                             f"(from {archive.url}); refusing to use it")


def download(archive: Archive, folder: Path, timeout: float = 60.0) -> Path:
    """`archive` into `folder`, checked; an already downloaded file that checks out is reused."""
    if not archive.digests:
        raise FetchError(f"{archive.name}: no checksum to verify it against; refusing to use it")
    folder.mkdir(parents=True, exist_ok=True)
    path, part = folder / archive.name, folder / f"{archive.name}.part"
    if path.exists():
        try:
            _check(archive, path)
            logger.info("fetch: %s already here, checksum ok", path)
            return path
        except FetchError:
            path.unlink()
    logger.info("fetch: downloading %s", archive.url)
    try:
        with urllib.request.urlopen(archive.url, timeout=timeout) as response, open(part, "wb") as handle:
            while chunk := response.read(CHUNK):
                handle.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as error:
        part.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise FetchError(f"{archive.name}: cannot download {archive.url}: {reason}") from None
    try:
        _check(archive, part)
    except FetchError:
        part.unlink(missing_ok=True)
        raise
    part.replace(path)
    return path


def _member_names(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Base name -> member, for regular files outside macOS resource folders (no paths kept: nothing escapes)."""
    found = {}
    for info in archive.infolist():
        parts = PurePosixPath(info.filename).parts
        if info.is_dir() or not parts or "__MACOSX" in parts or parts[-1].startswith("."):
            continue
        found[parts[-1]] = info
    return found


def _read_captions(text: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> list[tuple[str, int, str]]:
    if "Flickr8k.token.txt" not in members:
        raise FetchError("Flickr8k_text.zip has no Flickr8k.token.txt")
    rows = []
    for line in text.read(members["Flickr8k.token.txt"]).decode("utf-8").splitlines():
        if not line.strip():
            continue
        left, _, caption = line.partition("\t")
        name, _, index = left.partition("#")
        rows.append((name.strip(), int(index) if index.strip().isdigit() else 0, caption.strip()))
    return rows


def convert_flickr8k(dataset_zip: Path, text_zip: Path, out: Path) -> dict[str, int]:
    """The two archives -> ``out/images/``, ``out/captions.csv`` and ``out/splits.json``; returns counts."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dataset_zip) as images, zipfile.ZipFile(text_zip) as text:
        photos = {n: i for n, i in _member_names(images).items() if n.lower().endswith(".jpg")}
        text_members = _member_names(text)
        rows = sorted(r for r in _read_captions(text, text_members) if r[0] in photos)
        captioned = sorted({name for name, _, _ in rows})
        for name in captioned:
            (images_dir / name).write_bytes(images.read(photos[name]))
        splits = {split: [n for n in text.read(text_members[f]).decode("utf-8").split() if n in photos]
                  for split, f in SPLIT_FILES.items() if f in text_members}
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("image", "caption"))
        writer.writerows((name, caption) for name, _, caption in rows)
    (out / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
    counts = {"images": len(captioned), "captions": len(rows), **{s: len(v) for s, v in splits.items()}}
    logger.info("fetch: %s", counts)
    return counts


def fetch_flickr8k(out: str | Path, archives: tuple[Archive, ...] = FLICKR8K, keep_archives: bool = False,
                   timeout: float = 60.0) -> dict[str, int]:
    """Download (to out/archives), verify, convert; the archives are deleted afterwards unless `keep_archives`."""
    out = Path(out)
    by_name = {a.name: a for a in archives}
    missing = {"Flickr8k_Dataset.zip", "Flickr8k_text.zip"} - set(by_name)
    if missing:
        raise FetchError(f"the sources table lacks {', '.join(sorted(missing))}")
    folder = out / "archives"
    paths = {name: download(archive, folder, timeout) for name, archive in by_name.items()}
    try:
        counts = convert_flickr8k(paths["Flickr8k_Dataset.zip"], paths["Flickr8k_text.zip"], out)
    except (zipfile.BadZipFile, UnicodeDecodeError, KeyError) as error:
        raise FetchError(f"cannot convert the archives: {error}") from None
    if not keep_archives:
        for path in paths.values():
            path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    return counts
