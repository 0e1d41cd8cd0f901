"""Cleaned shards load in open_clip's own training loader, in a downstream trainer's environment.

open_clip's training requirements pin webdataset<=0.2.86, and with the webdataset 1.x our venv has,
`open_clip_train.data.get_wds_dataset` fails (KeyError 'fname' on webdataset's end-of-shard marker). So this
test builds (once, cached) a separate clean virtualenv with a trainer's pins and runs the loader there, in a
subprocess; the pipeline itself runs here, in the project's venv.

The venv lives at $BICRO_DOWNSTREAM_VENV, or ~/.cache/bicro-clean/downstream-venv-<hash of the pins>. It holds
only what a trainer pins differently from us (webdataset 0.2.86, pandas) and reaches torch, torchvision and
open-clip-torch through a .pth file pointing at this venv's site-packages, placed after its own: a second copy of
torch would cost 5.6 GB of disk (the CI machine's disk filled up once with it), and those three are the same
releases a trainer installs. The first build takes seconds to a minute.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from conftest import numbered_shards, tiny_config
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.run import run_pipeline
from bicro_clean.pipeline.shards import RawSample
from bicro_clean.pipeline.tar_reader import iter_shard

logger = logging.getLogger(__name__)

# What a downstream open_clip trainer installs on top of torch, torchvision and open-clip-torch (which it shares
# with our venv). webdataset goes in with --no-deps --ignore-installed so pip never touches our venv's 1.x.
DOWNSTREAM_PINS = ("webdataset==0.2.86", "pandas", "braceexpand")
# Shared with our venv, so part of the cache key: a venv built against other releases must not be reused.
SHARED_PACKAGES = ("torch", "torchvision", "open-clip-torch")
BASE_PTH = "zz-bicro-base-venv.pth"
READY_MARKER = ".bicro-downstream-ready"
BUILD_TIMEOUT_S = 1800
LOADER_TIMEOUT_S = 600
# pip's words for "could not reach a package index": the only build failure that skips instead of failing.
NETWORK_ERRORS = re.compile(r"Failed to establish a new connection|Network is unreachable|Temporary failure in name "
                            r"resolution|Could not fetch URL|ConnectTimeoutError|ReadTimeoutError|"
                            r"ProxyError")


# Runs inside the downstream venv. argv: JSON {"urls": [...], "samples": N or null, "train_data": optional
# --train-data (default: the urls joined by "::")}. Without samples the loader takes the count from sizes.json, as
# open_clip does without --train-num-samples. Prints one JSON line.
DOWNSTREAM_SCRIPT = r'''
import argparse, hashlib, json, sys

import open_clip
import torch
import webdataset as wds
from open_clip_train.data import get_wds_dataset

spec = json.loads(sys.argv[1])
urls, samples, train_data = spec["urls"], spec["samples"], spec.get("train_data") or "::".join(spec["urls"])
torch.set_num_threads(1)
# Deterministic eval transform (the train one crops at random) so raw samples and loader output can be matched.
preprocess = open_clip.image_transform(32, is_train=False)
tokenizer = open_clip.get_tokenizer("ViT-B-32")


def tensor_digest(image, tokens):
    h = hashlib.sha256(image.contiguous().numpy().tobytes())
    h.update(tokens.contiguous().numpy().tobytes())
    return h.hexdigest()


# 1. Raw bytes as webdataset 0.2.86 reads them, plus what the loader should make of each sample.
raw, expected = [], []
for sample in wds.WebDataset(urls, shardshuffle=False):
    ext = next(e for e in ("jpg", "png", "jpeg", "webp") if e in sample)
    raw.append({"key": sample["__key__"], "url": sample["__url__"], "image_ext": ext,
                "image_sha256": hashlib.sha256(sample[ext]).hexdigest(),
                "caption": sample["txt"].decode("utf-8")})
    image = wds.autodecode.imagehandler("pilrgb")(ext, sample[ext])
    expected.append(tensor_digest(preprocess(image), tokenizer(sample["txt"].decode("utf-8"))[0]))

# 2. open_clip's training loader, exactly as open_clip_train.main builds it (is_train=True: shard and sample
# shuffles, with_epoch). batch_size 1 makes the sample count exact: train batches drop a partial last batch.
args = argparse.Namespace(
    train_data=train_data, val_data=None, train_num_samples=samples, val_num_samples=None,
    dataset_resampled=False, train_data_upsampling_factors=None, seed=0, batch_size=1, workers=0, world_size=1)
data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, floor=False, tokenizer=tokenizer)
seen, shapes = [], set()
for images, texts in data.dataloader:
    shapes.add((tuple(images.shape), str(images.dtype), tuple(texts.shape), str(texts.dtype)))
    seen += [tensor_digest(i, t) for i, t in zip(images, texts)]

print(json.dumps({"webdataset": getattr(wds, "__version__", None),
                  "open_clip": open_clip.__version__, "raw": raw, "expected": sorted(expected),
                  "loader": sorted(seen), "loader_batches": data.dataloader.num_batches,
                  "loader_samples": data.dataloader.num_samples,
                  "shapes": sorted(map(list, shapes))}))
'''


# ---------------------------------------------------------------------------------------------- the venv


def base_site_packages() -> Path:
    """This venv's site-packages: where the downstream venv finds torch, torchvision and open-clip-torch."""
    return Path(sysconfig.get_paths()["purelib"])


def pins_hash(pins: tuple[str, ...] = DOWNSTREAM_PINS) -> str:
    """Key of a venv: the pins, the interpreter's minor version (a venv is tied to its Python), the base it layers
    over and the shared packages' versions there."""
    shared = {name: importlib.metadata.version(name) for name in SHARED_PACKAGES}
    payload = json.dumps({"pins": list(pins), "python": list(sys.version_info[:2]),
                          "base": str(base_site_packages()), "shared": shared})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def venv_dir() -> Path:
    override = os.environ.get("BICRO_DOWNSTREAM_VENV")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "bicro-clean" / f"downstream-venv-{pins_hash()}"


def _clean_env() -> dict[str, str]:
    """This process's environment without our venv leaking in, with few threads (2 shared cores)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return env


def _is_ready(path: Path) -> bool:
    if not (path / "bin" / "python").exists():
        return False
    # An explicit BICRO_DOWNSTREAM_VENV may be the user's own venv: trust it; our cache needs the marker.
    return "BICRO_DOWNSTREAM_VENV" in os.environ or (path / READY_MARKER).exists()


def _pip_install(python: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    return subprocess.run(command, capture_output=True, text=True, env=_clean_env(), timeout=BUILD_TIMEOUT_S)


def _venv_site_packages(python: Path) -> Path:
    done = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=_clean_env())
    return Path(done.stdout.strip())


def _install_pins(python: Path, pins: tuple[str, ...]) -> subprocess.CompletedProcess:
    """webdataset alone and without dependencies (pip must not try to replace the base's 1.x); the rest normally,
    their dependencies found in the base where it has them."""
    wds_pins = tuple(p for p in pins if p.startswith("webdataset"))
    other_pins = tuple(p for p in pins if not p.startswith("webdataset"))
    done = _pip_install(python, "--no-deps", "--ignore-installed", *wds_pins) if wds_pins else None
    if done is None or done.returncode == 0:
        done = _pip_install(python, *other_pins)
    return done


def build_venv(target: Path, pins: tuple[str, ...] = DOWNSTREAM_PINS) -> float:
    """Build a venv at `target` (in a scratch folder, renamed when complete); returns seconds taken.

    Building beside the target and renaming means an interrupted build never looks ready. Only bin/python is
    used afterwards, and it finds its site-packages relative to itself, so the renamed venv works.
    """
    start = time.monotonic()
    scratch = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(scratch)], check=True, env=_clean_env())
    python = scratch / "bin" / "python"
    # A .pth line is appended to sys.path after the venv's own site-packages, so the pins shadow the base.
    (_venv_site_packages(python) / BASE_PTH).write_text(f"{base_site_packages()}\n")
    done = _install_pins(python, pins)
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        output = done.stdout + done.stderr
        if NETWORK_ERRORS.search(output):
            pytest.skip(f"cannot build the downstream venv (no package index reachable?): {output[-800:]}")
        raise RuntimeError(f"pip install {' '.join(pins)} failed:\n{output[-4000:]}")
    (scratch / READY_MARKER).write_text(json.dumps(list(pins)))
    if _is_ready(target):  # another test process finished first: keep the venv it may be using
        shutil.rmtree(scratch)
    else:
        shutil.rmtree(target, ignore_errors=True)  # an unfinished or foreign folder in our cache slot
        scratch.rename(target)
    return time.monotonic() - start


@pytest.fixture(scope="session")
def downstream_python() -> Path:
    target = venv_dir()
    if not _is_ready(target):
        if "BICRO_DOWNSTREAM_VENV" in os.environ and target.exists():  # never delete a folder we did not make
            raise RuntimeError(f"BICRO_DOWNSTREAM_VENV={target} exists but has no bin/python")
        seconds = build_venv(target)
        logger.warning("built downstream venv %s in %.0f s", target, seconds)
        print(f"\nbuilt downstream venv {target} in {seconds:.0f} s")
    return target / "bin" / "python"


# ------------------------------------------------------------------------------------------ the cleaned run


@pytest.fixture(scope="module")
def cleaned(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("downstream-out")
    config = tiny_config(str(tiny_shards / "*.tar"), out, select={"keep_fraction": 0.5}, out={"maxcount": 2})
    run_pipeline(config)
    return out


def input_samples(shard_dir: Path) -> dict[tuple[str, str], RawSample]:
    """(shard file name, key) -> raw input sample, read with the pipeline's own reader."""
    samples = {}
    for path in sorted(shard_dir.glob("*.tar")):
        for item in iter_shard(str(path), ReaderConfig()):
            if isinstance(item, RawSample):
                samples[(path.name, item.key)] = item
    return samples


def run_downstream(python: Path, urls: list[str], samples: int | None, tmp_path: Path,
                   train_data: str | None = None) -> dict[str, Any]:
    script = tmp_path / "downstream_loader.py"
    script.write_text(DOWNSTREAM_SCRIPT)
    spec = {"urls": urls, "samples": samples, "train_data": train_data}
    done = subprocess.run([str(python), str(script), json.dumps(spec)],
                          capture_output=True, text=True, env=_clean_env(), timeout=LOADER_TIMEOUT_S, cwd=tmp_path)
    assert done.returncode == 0, f"downstream loader failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kept_rows(out: Path) -> dict[str, dict[str, Any]]:
    """output_key -> annotated row of every kept sample, checked against keep_keys.parquet."""
    annotated = pl.read_parquet(str(out / "annotated" / "*.parquet")).filter(pl.col("decision") == "keep")
    keep_keys = pl.read_parquet(out / "keep_keys.parquet")
    assert sorted(keep_keys.select("shard", "key").iter_rows()) == sorted(annotated.select("shard", "key").iter_rows())
    return {row["output_key"]: row for row in annotated.iter_rows(named=True)}


@pytest.mark.slow
def test_open_clip_train_loader_reads_cleaned_shards(cleaned, tiny_shards, downstream_python, tmp_path):
    manifest = json.loads((cleaned / "manifest.json").read_text())
    kept = manifest["counts"]["kept"]
    assert kept > 0
    urls = sorted(str(p) for p in (cleaned / "shards").glob("*.tar"))
    result = run_downstream(downstream_python, urls, kept, tmp_path)

    if "BICRO_DOWNSTREAM_VENV" not in os.environ:  # a venv given by the user may hold other versions
        assert result["webdataset"] == "0.2.86"
    # The loader yields each kept sample exactly once, decoded and tokenised as from the raw bytes.
    assert len(result["loader"]) == kept == len(result["raw"]) == result["loader_batches"]
    assert result["loader"] == result["expected"]
    assert result["shapes"] == [[[1, 3, 32, 32], "torch.float32", [1, 77], "torch.int64"]]

    # The bytes webdataset 0.2.86 reads are the input shards' bytes for the same original keys.
    rows, inputs = _kept_rows(cleaned), input_samples(tiny_shards)
    assert sorted(r["key"] for r in result["raw"]) == sorted(rows)
    for sample in result["raw"]:
        row = rows[sample["key"]]
        original = inputs[(row["shard"].rsplit("/", 1)[-1], row["key"])]
        image = original.members[sample["image_ext"]]
        assert sample["image_sha256"] == hashlib.sha256(image).hexdigest()
        assert sample["caption"].encode() == original.members["txt"]


# ------------------------------------------------------------------------------- packed shards, brace range


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """`bicro-clean run` on 5 input shards of 6 pairs with --maxcount 10 (the output folder and the summary): the
    kept samples of several input shards are packed into each cleaned shard."""
    root = tmp_path_factory.mktemp("packed")
    shards, out = numbered_shards(root, 15, (16, 16), shard_size=6), root / "out"
    command = [str(Path(sys.executable).parent / "bicro-clean"), "-q", "run", "--input", str(shards / "*.tar"),
               "--out", str(out), "--encoder", "tiny", "--maxcount", "10", "--keep-fraction", "0.7",
               "--runner", "none"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=LOADER_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_open_clip_reads_the_brace_range_and_sizes_json(packed, downstream_python, tmp_path):
    """open_clip's `--train-data` brace range from the summary, no `--train-num-samples`: the loader takes the count
    from shards/sizes.json and one epoch yields every kept pair exactly once."""
    out, summary = packed
    kept, cleaned = summary["kept"], summary["cleaned_shards"]
    names = [f"{i:05d}" for i in range(-(-kept // 10))]
    assert 20 < kept < 30 and cleaned == {"train_data": f"{out}/shards/{{00000..{names[-1]}}}.tar",
                                          "samples": kept, "sizes": f"{out}/shards/sizes.json"}
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sizes == {f"{name}.tar": min(10, kept - 10 * i) for i, name in enumerate(names)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cleaned_shards"] == {"train_data": f"shards/{{00000..{names[-1]}}}.tar", "samples": kept,
                                          "sizes": "shards/sizes.json"}
    stats = [json.loads((out / "shards" / f"{name}_stats.json").read_text()) for name in names]
    assert max(len(s["input_shards"]) for s in stats) > 1  # packed: input shards share a cleaned shard
    assert sum(s["count"] for s in stats) == summary["in"] and [s["successes"] for s in stats] == list(sizes.values())

    urls = [str(out / "shards" / f"{name}.tar") for name in names]
    result = run_downstream(downstream_python, urls, None, tmp_path, train_data=cleaned["train_data"])
    assert result["loader_samples"] == kept == len(result["loader"]) == result["loader_batches"] == len(result["raw"])
    assert result["loader"] == result["expected"]  # each kept pair once, decoded as from its raw bytes

    # annotated/ says where each kept row went: the cleaned shard and the position in it
    rows = _kept_rows(out)
    assert sorted(r["key"] for r in result["raw"]) == sorted(rows)
    positions: dict[str, int] = {}
    for sample in result["raw"]:  # webdataset's order: shard by shard, samples in tar order
        name = sample["url"].rsplit("/", 1)[-1]
        row = rows[sample["key"]]
        assert (row["output_shard"], row["output_index"]) == (name, positions.get(name, 0))
        positions[name] = positions.get(name, 0) + 1
