"""Issue 16's acceptance check: a 300-sample run in which every hostile input of issues 6 and 16 appears once
completes under both runners (`--runner none` and the default Prefect flow), with one row per sample, a specific
reason for each bad one, and the same bytes in every output file.

The CLI runs in child processes, as a user starts it. Every usable sample is kept (threshold 0.0), so the error
rows are exactly the hostile ones. The damage of the cut and the corrupt shard lies in their LAST sample, so every
one of the 300 samples built is either read or counted as lost: the keyed rows are exactly the 300 samples, plus
one key-less row per damaged shard saying what broke.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from conftest import TINY_BICRO, TINY_EMBED, Member, header_offsets, image_bytes, tar_bytes
from bicro_clean.pipeline.write import SHARD_REASONS
from bicro_clean.pipeline.manifest_shards import read_manifest

BIN = Path(sys.executable).parent
WEIRD = "pipe:touch X;x.tar"  # run as a command, it would create a file X in the working directory
SAMPLES = 300
SIZES = {"a-hostile.tar": 60, WEIRD: 40, "c-cut.tar": 30, "d-corrupt.tar": 30, "e-good.tar": 140}


# ---------------------------------------------------------------- small builders


def _noise_jpeg(seed: int) -> bytes:
    """A distinct image per good sample, as in tests/e2e/test_hostile.py."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _good(key: str, seed: int) -> list[Member]:
    return [(f"{key}.jpg", _noise_jpeg(seed)), (f"{key}.txt", f"photo {seed} of thing {seed % 7}".encode()),
            (f"{key}.json", json.dumps({"url": f"http://example.com/{seed}.jpg"}).encode())]


def _bomb() -> bytes:
    """A PNG whose header claims 40000x40000 pixels (4.8 GB decoded) and holds none: a 16x16 PNG, IHDR rewritten."""
    data = bytearray(image_bytes("PNG"))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", 40000, 40000)
    data[12:29], data[29:33] = ihdr, struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def _exif_photos() -> dict[str, bytes]:
    """A portrait photo (red top, blue bottom) stored turned left with EXIF orientation 6 (tests/pipeline/
    test_exif_orientation.py: stored 60x40, a viewer shows 40x60), and two untagged twins to compare its
    embedding with: the photo upright, and the stored (sideways) pixels."""
    pixels = np.zeros((60, 40, 3), dtype=np.uint8)
    pixels[:20], pixels[20:] = (255, 0, 0), (0, 0, 255)
    upright = Image.fromarray(pixels)
    sideways = upright.rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6

    def jpeg(image: Image.Image, **save) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95, **save)
        return buffer.getvalue()

    return {"exif": jpeg(sideways, exif=exif.tobytes()), "upright": jpeg(upright), "sideways": jpeg(sideways)}


def _special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "g0.jpg"
    return info


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


# ---------------------------------------------------------------- the corpus


def _hostile() -> tuple[list[Member], dict[str, str], list[str]]:
    """Every per-sample hostile kind once, each followed by a good sample: (members, key -> reason, good keys)."""
    jpeg, caption = _noise_jpeg(9999), b"a caption"

    def pair(key: str, text: bytes, image: bytes = jpeg, ext: str = "jpg") -> list[Member]:
        return [(f"{key}.{ext}", image), (f"{key}.txt", text)]

    thin = image_bytes("PNG", size=(1, 20_000), optimize=True)
    assert len(thin) < 1000  # a few hundred bytes that would resize to 224 x 4,480,000
    bad = {  # key in annotated -> (members, expected reason)
        # issue 16
        "thin": (pair("thin", caption, thin, "png"), "image_aspect_ratio"),
        "symlink": ([_special("symlink.jpg", tarfile.SYMTYPE), ("symlink.txt", caption)], "non_file_member"),
        "hardlink": ([("hardlink.txt", caption), _special("hardlink.jpg", tarfile.LNKTYPE)], "non_file_member"),
        "device": ([_special("device.jpg", tarfile.CHRTYPE), ("device.txt", caption)], "non_file_member"),
        "nul": (pair("nul", b"\x00\x00\x00"), "empty_caption"),
        "zerowidth": (pair("zerowidth", "\u200b\u200c\u200d\u00ad".encode()), "empty_caption"),
        "bom": (pair("bom", "\ufeff\u200b".encode()), "empty_caption"),
        "combining": (pair("combining", "\u0301\u0308\u0327".encode()), "empty_caption"),
        "deepjson": (pair("deepjson", caption) + [("deepjson.json", _nested(960))], "invalid_json"),
        # issue 6 (tests/e2e/test_hostile.py)
        "html": (pair("html", caption, b"<html><body>404 Not Found</body></html>"), "decode_error"),
        "zero": (pair("zero", caption, b""), "decode_error"),
        "bomb": (pair("bomb", caption, _bomb(), "png"), "image_too_large"),
        "nocap": ([("nocap.jpg", jpeg)], "missing_caption"),
        "noimage": ([("noimage.txt", caption)], "missing_image"),
        "latin1": (pair("latin1", "caf\xe9 cr\xe8me".encode("latin-1")), "caption_not_utf8"),
        "blank": (pair("blank", b" \t\r\n "), "empty_caption"),
        "huge": (pair("huge", b"word " * 209_716), "caption_too_long"),  # 1 MB
        "notjson": (pair("notjson", caption) + [("notjson.json", b"{'url': nope")], "invalid_json"),
        "nanjson": (pair("nanjson", caption) + [("nanjson.json", b'{"w": NaN}')], "invalid_json"),
        "../escape": (pair("../escape", caption), "unsafe_member_name"),
        "/etc/evil": (pair("/etc/evil", caption), "unsafe_member_name"),
        "bell\x07\x1b[2J": (pair("bell\x07\x1b[2J", caption), "unsafe_member_name"),
        # a name that is not UTF-8 (tarfile writes the surrogate back as the byte 0xe9); annotated shows it escaped
        "latin\\xe9name": (pair("latin\udce9name", caption), "unsafe_member_name"),
    }
    members: list[Member] = _good("g0", 0)  # the link members point at g0.jpg
    good = ["g0"]
    for i, (group, _) in enumerate(bad.values(), start=1):
        members += group + _good(f"g{i}", i)
        good.append(f"g{i}")
    for key, photo in _exif_photos().items():
        members += [(f"{key}.jpg", photo), (f"{key}.txt", b"a red roof")]
        good.append(key)
    filler = SIZES["a-hostile.tar"] - len(bad) - len(good)
    for i in range(filler):
        members += _good(f"a{i}", 1000 + i)
        good.append(f"a{i}")
    return members, {key: reason for key, (_, reason) in bad.items()}, good


def _goods(prefix: str, n: int, seed: int) -> tuple[list[Member], list[str]]:
    keys = [f"{prefix}{i}" for i in range(n)]
    return [m for i, key in enumerate(keys) for m in _good(key, seed + i)], keys


def _cut(n: int) -> tuple[bytes, list[str]]:
    """n samples, cut in the middle of the last sample's image data (a download that stopped)."""
    members, keys = _goods("c", n, 2000)
    data = tar_bytes(members)
    return data[: header_offsets(data)[f"{keys[-1]}.jpg"] + 512 + 300], keys


def _corrupt(n: int) -> tuple[bytes, list[str]]:
    """n samples, the header of the last sample's caption overwritten: a corrupt archive, not its end."""
    members, keys = _goods("r", n, 3000)
    data = bytearray(tar_bytes(members))
    offset = header_offsets(bytes(data))[f"{keys[-1]}.txt"]
    data[offset:offset + 100] = b"\x13" * 100
    return bytes(data), keys


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("both-runners-shards")
    hostile, expected, good = _hostile()
    weird, weird_keys = _goods("p", SIZES[WEIRD], 4000)
    cut, cut_keys = _cut(SIZES["c-cut.tar"])
    corrupt, corrupt_keys = _corrupt(SIZES["d-corrupt.tar"])
    clean, clean_keys = _goods("e", SIZES["e-good.tar"], 5000)
    files = {"a-hostile.tar": tar_bytes(hostile), WEIRD: tar_bytes(weird), "c-cut.tar": cut,
             "d-corrupt.tar": corrupt, "e-good.tar": tar_bytes(clean)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    samples = {"a-hostile.tar": [*expected, *good], WEIRD: weird_keys, "c-cut.tar": cut_keys,
               "d-corrupt.tar": corrupt_keys, "e-good.tar": clean_keys}
    assert {name: len(keys) for name, keys in samples.items()} == SIZES and sum(SIZES.values()) == SAMPLES
    assert all(len(set(keys)) == len(keys) for keys in samples.values())
    lost = {"c-cut.tar": (cut_keys[-1], "shard_truncated"), "d-corrupt.tar": (corrupt_keys[-1], "shard_corrupt")}
    return {"root": root, "samples": samples, "expected": expected, "good": good, "lost": lost}


# ---------------------------------------------------------------- both runs


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path. Nothing is excluded: the manifest and report hold no
    timings or run paths (tests/e2e/test_resume.py and tests/flows/test_flows.py compare whole trees the same way;
    test_flows leaves report.html out only because a build without the report module has none)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(config: Path, shards: Path, out: Path, cwd: Path, *runner: str) -> float:
    """`bicro-clean run` in a child process, with a private ephemeral Prefect home; returns its wall time."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(cwd / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [str(BIN / "bicro-clean"), "run", "-c", str(config), "--input", str(shards / "*.tar"),
               "--out", str(out), *runner]
    start = time.perf_counter()
    done = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict:
    """The same config through `--runner none` and through the default runner (the Prefect flow on threads),
    each from its own working directory, where a pipe name run as a command would leave its X. About 35-60 s
    per run on 2 busy cores."""
    parent = tmp_path_factory.mktemp("both-runners-run")
    config = parent / "tiny.yaml"
    config.write_text(yaml.safe_dump({"embed": TINY_EMBED, "bicro": TINY_BICRO, "select": {"threshold": 0.0}}))
    inputs_before = _hashes(corpus["root"])
    result = {"parent": parent, "seconds": {}}
    for name, runner in (("none", ("--runner", "none")), ("prefect", ())):
        cwd = parent / f"cwd-{name}"
        cwd.mkdir()
        out = parent / f"OUT_{name.upper()}"
        result["seconds"][name] = _run(config, corpus["root"], out, cwd, *runner)
        result[name] = {"out": out, "cwd": cwd, "hashes": _hashes(out),
                        "annotated": pl.read_parquet(str(out / "annotated" / "*.parquet")),
                        "manifest": read_manifest(str(out))}
    assert _hashes(corpus["root"]) == inputs_before  # inputs are only read
    print(f"\nrun times: {result['seconds']}")
    return result


RUNNERS = ["none", "prefect"]


# ---------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_one_row_per_sample_and_a_row_per_damaged_shard(runs, corpus, runner):
    annotated, manifest = runs[runner]["annotated"], runs[runner]["manifest"]
    shard = annotated["shard"].map_elements(os.path.basename, return_dtype=pl.String)
    keyed = Counter((s, k) for s, k in zip(shard, annotated["key"]) if k != "")
    expected = Counter((name, key) for name, keys in corpus["samples"].items() for key in keys)
    assert sum(expected.values()) == SAMPLES
    assert keyed == expected  # each of the 300 samples exactly once, in the shard it came from
    keyless = annotated.filter(pl.col("key") == "")
    assert sorted(zip(keyless["shard"].map_elements(os.path.basename, return_dtype=pl.String),
                      keyless["reason"])) == [("c-cut.tar", "shard_truncated"), ("d-corrupt.tar", "shard_corrupt")]
    assert annotated.height == SAMPLES + 2 == manifest["counts"]["in"]
    inputs = {os.path.basename(i["url"]): i for i in manifest["inputs"]}
    assert sorted(inputs) == sorted(SIZES)
    for name, size in SIZES.items():
        damaged = name in corpus["lost"]
        assert inputs[name]["samples_read"] == size - damaged and inputs[name]["samples_lost"] == int(damaged)
        assert (inputs[name]["damage"] or {}).get("reason") == (corpus["lost"][name][1] if damaged else None)


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_every_hostile_sample_has_its_specific_reason(runs, corpus, runner):
    annotated = runs[runner]["annotated"]
    errors = annotated.filter(pl.col("decision") == "error")
    hostile = errors.filter(pl.col("shard").str.ends_with("/a-hostile.tar"))
    assert dict(zip(hostile["key"], hostile["reason"])) == corpus["expected"] and hostile.height == len(
        corpus["expected"])
    assert hostile["detail"].null_count() == 0
    for name, (key, reason) in corpus["lost"].items():  # the damaged shards' last samples, and nothing else there
        rows = errors.filter(pl.col("shard").str.ends_with("/" + name)).sort("key")
        # The key-less row says how the shard broke. The sample being read when it broke is shard_truncated in
        # both cases (pipeline.tar_reader: its members after the break were never read), also in the corrupt one.
        assert list(zip(rows["key"], rows["reason"])) == [("", reason), (key, "shard_truncated")]
        assert "sample in progress when the shard broke" in rows["detail"][1]
        assert "samples read before the break" in rows["detail"][0] and reason in SHARD_REASONS
    other = errors.filter(~pl.col("shard").str.contains("a-hostile.tar|c-cut.tar|d-corrupt.tar"))
    assert other.height == 0, other.select("shard", "key", "reason")
    usable = annotated.filter(pl.col("decision") != "error")
    assert set(usable["decision"]) == {"keep"}  # threshold 0.0: every usable sample is kept
    assert usable.height == SAMPLES - len(corpus["expected"]) - len(corpus["lost"])


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_the_exif_rotated_photo_is_kept_and_the_pipe_named_shard_is_read_as_a_file(runs, corpus, runner,
                                                                                   tmp_path_factory):
    annotated = runs[runner]["annotated"]
    exif = annotated.filter(pl.col("key") == "exif")
    assert exif["decision"].to_list() == ["keep"]
    assert (exif["width"][0], exif["height"][0]) == (60, 40)  # the stored size is what is recorded
    # embedded upright: its image embedding is the upright twin's (up to JPEG noise), not the stored pixels'
    embeddings = pl.read_parquet(str(runs[runner]["out"] / "embeddings" / "a-hostile-*.parquet"))
    vectors = {key: np.asarray(vector, dtype=np.float64) for key, vector in zip(embeddings["key"],
                                                                               embeddings["image_emb"])}

    def cosine(a: str, b: str) -> float:
        return float(vectors[a] @ vectors[b] / np.linalg.norm(vectors[a]) / np.linalg.norm(vectors[b]))

    # (the tiny encoder barely tells the two apart: cosine distances ~2e-7 upright vs ~1e-3 sideways)
    upright, sideways = 1 - cosine("exif", "upright"), 1 - cosine("exif", "sideways")
    assert upright < sideways / 100, (upright, sideways)
    weird = annotated.filter(pl.col("shard").str.ends_with("/" + WEIRD))
    assert sorted(weird["key"]) == sorted(corpus["samples"][WEIRD]) and set(weird["decision"]) == {"keep"}
    # the children ran in runs["parent"]/cwd-*; the shards and outputs are under the same base temp folder
    written = [*tmp_path_factory.getbasetemp().rglob("X"), *Path.cwd().glob("X")]
    assert written == [], f"the shard name was run as a command: {written}"


@pytest.mark.slow
def test_both_runners_write_the_same_bytes(runs):
    none, prefect = runs["none"]["hashes"], runs["prefect"]["hashes"]
    assert sorted(none) == sorted(prefect)
    differ = sorted(rel for rel in none if none[rel] != prefect[rel])
    assert differ == [], differ
    assert {"manifest.json", "report.html"} <= set(none) and any(rel.startswith("shards/") for rel in none)
