"""Turn an image folder and an ``image,caption`` CSV into img2dataset-style WebDataset shards.

This is the trusted preparation tool behind ``bicro-clean make-shards``: bad input (a missing image, an unreadable
CSV row) is an error that names the row, not a recorded issue. Optional synthetic noise of one or several kinds
(pipeline/noise_kinds.py: shuffle, near-miss, alt-text) gives benchmark shards with a known ground truth in each
sample's ``KEY.json``: ``truth_clean``, ``noise_kind`` and ``true_image`` (the photo the sample's caption was written
for: another photo's for shuffle and near-miss, null for alt-text, which describes none).

Output bytes are deterministic (fixed mtime/owner, sorted members, USTAR), so the same inputs and seed always give
byte-identical shards and downstream caches stay valid.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Mapping

import numpy as np

from bicro_clean.pipeline.noise import noisy_count
from bicro_clean.pipeline.noise_kinds import KINDS, noise_plan, resolve_rates
from bicro_clean.pipeline.shards import IMAGE_EXTENSIONS
from bicro_clean.pipeline.writers import tar_info

logger = logging.getLogger(__name__)

SUMMARY_FILE = "_make_shards.json"
_SHARD_NAME = re.compile(r"^\d{5,}\.tar$")


@dataclass(frozen=True)
class CaptionRow:
    line: int  # line of the CSV file the row ends on (header is line 1)
    image: str
    caption: str


@dataclass(frozen=True)
class Pair:
    image: str  # the image actually paired (after noise)
    true_image: str | None  # the photo the caption was written for (None: boilerplate alt-text)
    caption: str
    caption_index: int  # 0-based index of the row among its image's captions, in CSV order
    line: int  # the CSV row this sample stands for (its caption may come from another row: near-miss)
    kind: str = "clean"  # noise kind (pipeline/noise_kinds.KINDS)


def sample_key(shard: int, index: int, shard_size: int) -> str:
    """img2dataset keys: 5-digit shard number + 4-digit index, the index field widened for larger shards."""
    width = max(4, len(str(shard_size - 1)))
    return f"{shard:05d}{index:0{width}d}"


# --------------------------------------------------------------------------------------------------------- input


def _parse_row(row: dict, line: int, source: Path) -> CaptionRow:
    if None in row:
        raise ValueError(f"{source}:{line}: more fields than the header (unquoted comma in a caption?)")
    image, caption = row.get("image"), row.get("caption")
    if image is None or caption is None:
        raise ValueError(f"{source}:{line}: missing the image or caption field")
    if not image.strip():
        raise ValueError(f"{source}:{line}: empty image name")
    if image.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", image):
        raise ValueError(f"{source}:{line}: image name {image!r} leaves the images folder")
    return CaptionRow(line, image, caption)


def read_caption_rows(source: Path) -> list[CaptionRow]:
    """All rows of an ``image,caption`` CSV; any unreadable row is an error naming its line."""
    with open(source, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{source}: header must have columns image,caption, got {reader.fieldnames}")
            return [_parse_row(row, reader.line_num, source) for row in reader]
        except (UnicodeDecodeError, csv.Error) as error:
            raise ValueError(f"{source}:{reader.line_num + 1}: unreadable row: {error}") from error


def _filter_split(rows: list[CaptionRow], split_file: Path | None, split: str | None) -> list[CaptionRow]:
    if split_file is None and split is None:
        return rows
    if split_file is None or split is None:
        raise ValueError("split_file and split go together")
    splits = json.loads(Path(split_file).read_text())
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {split_file} (it has {sorted(splits)})")
    keep = set(splits[split])
    kept = [row for row in rows if row.image in keep]
    without_captions = len(keep - {row.image for row in kept})
    if without_captions:
        logger.warning("%d images of split %r have no caption in the CSV", without_captions, split)
    return kept


def _limit(rows: list[CaptionRow], limit_images: int | None) -> list[CaptionRow]:
    if limit_images is None:
        return rows
    if limit_images < 1:
        raise ValueError(f"limit_images must be >= 1, got {limit_images}")
    keep = set(sorted({row.image for row in rows})[:limit_images])
    return [row for row in rows if row.image in keep]


def _check_images(rows: list[CaptionRow], images_dir: Path, source: Path) -> None:
    checked: set[str] = set()
    for row in rows:
        if row.image in checked:
            continue
        checked.add(row.image)
        extension = Path(row.image).suffix.lower().lstrip(".")
        if extension not in IMAGE_EXTENSIONS:
            raise ValueError(f"{source}:{row.line}: {row.image!r} is not one of {', '.join(IMAGE_EXTENSIONS)}")
        if not (images_dir / row.image).is_file():
            raise FileNotFoundError(f"{source}:{row.line}: image {row.image!r} not found in {images_dir}")


def _pairs(rows: list[CaptionRow], rates: Mapping[str, float], noise_seed: int) -> list[Pair]:
    """Order rows by (image name, CSV position), then apply the noise plan: each row becomes one sample with its
    (possibly another) image and its (possibly another, or boilerplate) caption."""
    rows = sorted(rows, key=lambda row: (row.image, row.line))
    names = sorted({row.image for row in rows})
    index = {name: i for i, name in enumerate(names)}
    true_image = np.array([index[row.image] for row in rows], dtype=np.int64)
    plan = noise_plan(true_image, [row.caption for row in rows], rates, noise_seed)
    positions: dict[str, int] = {}
    pairs = []
    for i, row in enumerate(rows):
        position = positions[row.image] = positions.get(row.image, -1) + 1
        source = int(plan.caption[i])
        written_for = None if source < 0 else rows[source].image
        pairs.append(Pair(names[plan.image[i]], written_for, plan.text[i], position, row.line, str(plan.kind[i])))
    return pairs


# -------------------------------------------------------------------------------------------------------- output


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """Deterministic tar, written to a temp file and renamed so a crash never leaves half a shard."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with tarfile.open(temp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(members):
                tar.addfile(tar_info(name, len(members[name])), io.BytesIO(members[name]))
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _sample_members(key: str, pair: Pair, images_dir: Path) -> dict[str, bytes]:
    extension = Path(pair.image).suffix.lower().lstrip(".")
    meta = {"key": key, "image": pair.image, "true_image": pair.true_image, "caption_index": pair.caption_index,
            "truth_clean": pair.kind == "clean", "noise_kind": pair.kind, "csv_line": pair.line}
    return {
        f"{key}.{extension}": (images_dir / pair.image).read_bytes(),
        f"{key}.txt": pair.caption.encode("utf-8"),
        f"{key}.json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def _chunks(pairs: list[Pair], size: int) -> Iterator[list[Pair]]:
    for start in range(0, len(pairs), size):
        yield pairs[start : start + size]


def _write_shards(pairs: list[Pair], images_dir: Path, out_dir: Path, shard_size: int) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shard, chunk in enumerate(_chunks(pairs, shard_size)):
        members: dict[str, bytes] = {}
        for index, pair in enumerate(chunk):
            members.update(_sample_members(sample_key(shard, index, shard_size), pair, images_dir))
        written.append(f"{shard:05d}.tar")
        write_tar(out_dir / written[-1], members)
    return written


def _remove_stale(out_dir: Path, written: list[str]) -> list[str]:
    """Shards of an earlier, larger run would be picked up by ``out/*.tar``: remove them."""
    stale = sorted(p.name for p in out_dir.iterdir() if _SHARD_NAME.match(p.name) and p.name not in written)
    for name in stale:
        logger.warning("removing stale shard %s from an earlier run", out_dir / name)
        (out_dir / name).unlink()
    return stale


def _select_rows(
    captions_csv: Path, split_file: str | Path | None, split: str | None, limit: int | None
) -> list[CaptionRow]:
    rows = _limit(_filter_split(read_caption_rows(captions_csv), split_file, split), limit)
    if not rows:
        raise ValueError(f"{captions_csv}: no caption rows left after split/limit filtering")
    return rows


def _count_kinds(pairs: list[Pair], rates: Mapping[str, float]) -> dict[str, int]:
    counts = {kind: sum(pair.kind == kind for pair in pairs) for kind in KINDS}
    for kind, rate in rates.items():
        if counts[kind] != noisy_count(len(pairs), rate):  # a single caption cannot be shuffled
            logger.warning("asked for %d %s captions, got %d", noisy_count(len(pairs), rate), kind, counts[kind])
    return counts


def make_shards(
    images_dir: str | Path,
    captions_csv: str | Path,
    out_dir: str | Path,
    shard_size: int = 1000,
    split_file: str | Path | None = None,
    split: str | None = None,
    noise_rate: float = 0.0,
    noise_seed: int = 0,
    limit_images: int | None = None,
    noise_kind: str = "shuffle",
    mix_rates: Mapping[str, float | None] | None = None,
) -> dict:
    """Write ``00000.tar, 00001.tar, ...`` and ``_make_shards.json``; return the summary. `noise_rate` is the rate
    of a single `noise_kind`; ``noise_kind="mix"`` takes `mix_rates` (per kind, noise_kinds.MIX_DEFAULTS)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    # mix takes its own rates: a non-zero noise_rate with it is refused by resolve_rates, not ignored
    rates = resolve_rates(noise_kind, noise_rate if noise_kind != "mix" or noise_rate else None, mix_rates)
    images_dir, captions_csv, out_dir = Path(images_dir), Path(captions_csv), Path(out_dir)
    rows = _select_rows(captions_csv, split_file, split, limit_images)
    _check_images(rows, images_dir, captions_csv)
    pairs = _pairs(rows, rates, noise_seed)
    written = _write_shards(pairs, images_dir, out_dir, shard_size)
    counts = _count_kinds(pairs, rates)
    summary = {"shards": len(written), "samples": len(pairs), "noisy": len(pairs) - counts["clean"],
               "noise_counts": counts, "noise_kind": noise_kind, "noise_rates": rates,
               "out_dir": str(out_dir), "images": len({pair.image for pair in pairs}),
               "shard_size": shard_size, "noise_rate": round(sum(rates.values()), 9), "noise_seed": noise_seed,
               "split": split, "removed_stale": _remove_stale(out_dir, written)}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %d samples (%d noisy) in %d shards to %s", len(pairs), summary["noisy"], len(written), out_dir)
    return summary
