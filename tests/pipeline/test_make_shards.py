"""make_shards: deterministic bytes, exact noise, split/limit selection, metadata, clear errors."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tarfile

import pytest

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import read_shard
from bicro_clean.pipeline.make_shards import SUMMARY_FILE, make_shards, sample_key
from bicro_clean.pipeline.shards import DecodedSample

N_IMAGES, CAPTIONS_PER_IMAGE = 10, 5


@pytest.fixture
def dataset(tmp_path, make_image):
    """10 tiny images (one PNG), 5 captions each, CSV rows interleaved so that CSV order != sorted order."""
    images = tmp_path / "images"
    images.mkdir()
    names = [f"im{i:02d}.png" if i == 3 else f"im{i:02d}.jpg" for i in range(N_IMAGES)]
    for i, name in enumerate(names):
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        (images / name).write_bytes(make_image(fmt, color=(20 * i, 255 - 20 * i, 7 * i)))
    rows = [(names[i], f"caption {c} of image {i}, with a comma") for c in range(CAPTIONS_PER_IMAGE)
            for i in reversed(range(N_IMAGES))]
    _write_csv(tmp_path / "captions.csv", rows)
    (tmp_path / "splits.json").write_text(json.dumps({"train": names[:6], "test": names[6:]}))
    return tmp_path


def _write_csv(path, rows, header=("image", "caption")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _make(root, out="out", **kwargs) -> dict:
    return make_shards(root / "images", root / "captions.csv", root / out, **kwargs)


def _samples(out_dir) -> list[DecodedSample]:
    items = [item for path in sorted(out_dir.glob("*.tar")) for item in read_shard(str(path), ReaderConfig())]
    assert all(isinstance(item, DecodedSample) for item in items), items
    return items


def _digests(out_dir) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out_dir.glob("*.tar"))}


def test_same_inputs_give_the_same_bytes(dataset):
    first = _make(dataset, "a", shard_size=7, noise_rate=0.4, noise_seed=3)
    second = _make(dataset, "b", shard_size=7, noise_rate=0.4, noise_seed=3)
    assert _digests(dataset / "a") == _digests(dataset / "b") and len(_digests(dataset / "a")) == 8
    assert {**first, "out_dir": ""} == {**second, "out_dir": ""}
    _make(dataset, "c", shard_size=7, noise_rate=0.4, noise_seed=4)
    assert _digests(dataset / "c") != _digests(dataset / "a")


def test_tar_layout_is_img2dataset_style(dataset):
    summary = _make(dataset, shard_size=7)
    assert (summary["shards"], summary["samples"], summary["noisy"]) == (8, 50, 0)
    assert json.loads((dataset / "out" / SUMMARY_FILE).read_text()) == summary
    with tarfile.open(dataset / "out" / "00001.tar") as tar:
        infos = tar.getmembers()
    names = [info.name for info in infos]
    assert names == sorted(names) and names[:3] == ["000010000.jpg", "000010000.json", "000010000.txt"]
    assert all((i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) == (0, 0, 0, "", "", 0o644) for i in infos)
    assert not list((dataset / "out").glob(".*"))  # no temp files left


def test_samples_are_ordered_by_image_then_csv_position(dataset):
    _make(dataset, shard_size=7)
    samples = _samples(dataset / "out")
    metas = [s.meta for s in samples]
    order = [(m["true_image"], m["caption_index"]) for m in metas]
    assert order == sorted(order) and len(order) == 50
    assert [m["caption_index"] for m in metas[:5]] == [0, 1, 2, 3, 4]
    assert samples[0].caption == "caption 0 of image 0, with a comma"
    assert all(m["key"] == s.key for m, s in zip(metas, samples))
    assert {s.key for s in samples} == {sample_key(i // 7, i % 7, 7) for i in range(50)}


@pytest.mark.parametrize("rate, expected", [(0.2, 10), (0.4, 20)])
def test_noise_is_exact_and_recorded_in_every_sample(dataset, rate, expected):
    summary = _make(dataset, shard_size=16, noise_rate=rate, noise_seed=1)
    samples = _samples(dataset / "out")
    assert summary["noisy"] == expected == sum(not s.meta["truth_clean"] for s in samples)
    images = dataset / "images"
    for sample in samples:
        meta = sample.meta
        assert meta["truth_clean"] == (meta["image"] == meta["true_image"])
        image_member = next(ext for ext in ("jpg", "png") if ext in sample.raw.members)
        assert sample.raw.members[image_member] == (images / meta["image"]).read_bytes()  # bytes unchanged
        assert image_member == meta["image"].rsplit(".", 1)[1]  # a PNG keeps .png
        assert sample.caption.endswith(f"of image {int(meta['true_image'][2:4])}, with a comma")


def test_split_and_limit_filtering(dataset):
    summary = _make(dataset, split_file=dataset / "splits.json", split="test")
    true_images = {s.meta["true_image"] for s in _samples(dataset / "out")}
    assert true_images == {f"im{i:02d}.jpg" for i in range(6, 10)} and summary["samples"] == 20
    summary = _make(dataset, "limited", split_file=dataset / "splits.json", split="train", limit_images=2)
    assert {s.meta["true_image"] for s in _samples(dataset / "limited")} == {"im00.jpg", "im01.jpg"}
    assert (summary["images"], summary["samples"]) == (2, 10)


def test_rerun_removes_stale_shards(dataset):
    _make(dataset, shard_size=5)
    summary = _make(dataset, shard_size=5, limit_images=2)
    assert sorted(p.name for p in (dataset / "out").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert summary["removed_stale"] == [f"{i:05d}.tar" for i in range(2, 10)]


def test_key_width_grows_with_big_shards():
    assert sample_key(3, 42, 1000) == "000030042"
    assert sample_key(3, 42, 10000) == "000030042"
    assert sample_key(3, 42, 20000) == "0000300042"


def test_clear_errors(dataset):
    (dataset / "images" / "im05.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"captions.csv:\d+: image 'im05.jpg' not found"):
        _make(dataset)
    with pytest.raises(ValueError, match="split 'val' is not in"):
        _make(dataset, split_file=dataset / "splits.json", split="val")
    _write_csv(dataset / "captions.csv", [("im00.jpg", "fine"), ("im01.jpg", "a", "b")])
    with pytest.raises(ValueError, match=r"captions.csv:3: more fields than the header"):
        _make(dataset)
    _write_csv(dataset / "captions.csv", [("im00.jpg", "fine"), ("im01.jpg",)])
    with pytest.raises(ValueError, match=r"captions.csv:3: missing"):
        _make(dataset)
    _write_csv(dataset / "captions.csv", [("im00.jpg", "fine")], header=("file", "text"))
    with pytest.raises(ValueError, match="header must have columns image,caption"):
        _make(dataset)
    (dataset / "captions.csv").write_bytes(b"image,caption\nim00.jpg,caf\xe9\n")
    with pytest.raises(ValueError, match="unreadable row"):
        _make(dataset)
    (dataset / "images" / "x.gif").write_bytes(b"GIF89a")
    _write_csv(dataset / "captions.csv", [("x.gif", "a gif")])
    with pytest.raises(ValueError, match="x.gif"):
        _make(dataset)


def test_noise_kind_and_truth_in_every_sample_json(dataset):
    summary = _make(dataset, shard_size=16, noise_kind="mix", noise_seed=2,
                    mix_rates={"shuffle": 0.2, "near-miss": 0.2, "alt-text": 0.1})
    assert summary["noise_counts"] == {"clean": 25, "shuffle": 10, "near-miss": 10, "alt-text": 5}
    assert (summary["noisy"], summary["noise_kind"], summary["noise_rate"]) == (25, "mix", 0.5)
    assert json.loads((dataset / "out" / SUMMARY_FILE).read_text())["noise_counts"] == summary["noise_counts"]
    samples = _samples(dataset / "out")
    kinds = [s.meta["noise_kind"] for s in samples]
    assert {k: kinds.count(k) for k in set(kinds)} == {"clean": 25, "shuffle": 10, "near-miss": 10, "alt-text": 5}
    for sample in samples:
        meta, kind = sample.meta, sample.meta["noise_kind"]
        assert meta["truth_clean"] == (kind == "clean")
        found = re.search(r"of image (\d+)", sample.caption)  # the photo the caption was written for
        caption_image = int(found.group(1)) if found else None
        if kind in ("clean", "shuffle"):  # the row's own caption; shuffle moves the image
            assert meta["true_image"] == f"im{caption_image:02d}.{'png' if caption_image == 3 else 'jpg'}"
            assert (meta["image"] == meta["true_image"]) == (kind == "clean")
        elif kind == "near-miss":  # the row's image, another photo's caption: true_image names that photo
            assert meta["image"] != meta["true_image"] and int(meta["true_image"][2:4]) == caption_image
        else:  # alt-text describes no photo
            assert meta["true_image"] is None and caption_image is None and sample.caption.strip()


def test_shuffle_kind_is_the_default_and_unchanged(dataset):
    default = _make(dataset, "a", shard_size=7, noise_rate=0.4, noise_seed=3)
    explicit = _make(dataset, "b", shard_size=7, noise_rate=0.4, noise_seed=3, noise_kind="shuffle")
    assert _digests(dataset / "a") == _digests(dataset / "b")
    assert {**default, "out_dir": ""} == {**explicit, "out_dir": ""}
    assert default["noise_counts"] == {"clean": 30, "shuffle": 20, "near-miss": 0, "alt-text": 0}
    assert {s.meta["noise_kind"] for s in _samples(dataset / "a")} == {"clean", "shuffle"}
    with pytest.raises(ValueError, match="mix only"):
        _make(dataset, "c", noise_rate=0.4, mix_rates={"alt-text": 0.1})
    with pytest.raises(ValueError, match="single kind"):
        _make(dataset, "c", noise_rate=0.4, noise_kind="mix")
