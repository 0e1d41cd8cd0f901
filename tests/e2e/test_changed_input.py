"""An input shard that changes between runs never leaves outputs made from its old bytes (content identity,
pipeline/content_id.py), under `--runner none` and the default Prefect runner, through the CLI as a user runs it.

Each case re-exports a shard with edited captions that keeps its size (tar pads to 10,240-byte records; the members
have fixed mtimes, so even the member headers stay the same):

- copied with `cp -p` over the original, both dated 1 (Nix, Bazel): the plain rerun embeds it again;
- served by `python -m http.server`, re-exported with a new mtime: the rerun sees the new Last-Modified;
- an edit in the middle of a long caption, where the up-front identity cannot see it, then an output-only change
  (`--maxcount 5`): the write stage finds it, stops with one line and exit 2 and invalidates the shard's
  embeddings; the next run gives fresh outputs.

After each, every annotated caption and every member of the cleaned shards is the input's current one.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import TINY_BICRO, tar_bytes

BIN = Path(sys.executable).parent
# Default embed settings apart from the encoder: decode workers on, so the digests cross the worker processes.
EMBED = {"encoder": "tiny", "batch_size": 8, "progress": False}
RUNNERS = {"none": ("--runner", "none"), "prefect": ()}
SAMPLES = 8
LONG = "a long alt text " * 120  # 1,920 bytes on each side of the part that changes


def _output_change() -> tuple[str, ...]:
    """An output-only change of the configuration, with --overwrite where an existing --out is refused to another
    configuration without it."""
    from bicro_clean.pipeline.config import CleanConfig

    out_fields = CleanConfig.model_fields["out"].annotation.model_fields
    return ("--maxcount", "5", *(("--overwrite",) if "overwrite" in out_fields else ()))


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _shard(prefix: str, captions: list[str]) -> bytes:
    members = []
    for i, caption in enumerate(captions):
        key = f"{prefix}{i:03d}"
        members += [(f"{key}.jpg", _jpeg(100 * ord(prefix[0]) + i)), (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps({"url": f"http://example.com/{key}.jpg"}).encode())]
    return tar_bytes(members)


def _captions(colour: str, long: bool = False) -> list[str]:
    """Same length for every colour: the re-exported shard keeps its size and its member headers."""
    return [f"{LONG}thing {i} in {colour}{LONG}" if long else f"a photo of thing {i} in {colour}"
            for i in range(SAMPLES)]


def _write(path: Path, data: bytes, mtime: float) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def _cp_p(source: Path, target: Path) -> None:
    subprocess.run(["cp", "-p", str(source), str(target)], check=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "shards").mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"embed": EMBED, "bicro": TINY_BICRO,
                                                          "select": {"threshold": 0.0}}))
    return tmp_path


def _run(workdir: Path, inputs: list[str], runner: str, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(workdir / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [str(BIN / "bicro-clean"), "run", "-c", str(workdir / "config.yaml"), "--out", str(workdir / "out"),
               *[arg for spec in inputs for arg in ("--input", spec)], *RUNNERS[runner], *extra]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900, check=False)


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _assert_fresh(out: Path, inputs: dict[str, bytes]) -> None:
    """Every annotated caption and every cleaned member is the one in the inputs now (shard name -> bytes)."""
    current = {name: _members(data) for name, data in inputs.items()}
    annotated = pl.read_parquet(str(out / "annotated" / "*.parquet"))
    assert annotated.height == SAMPLES * len(inputs) and set(annotated["decision"]) == {"keep"}
    for shard, key, caption in annotated.select("shard", "key", "caption").iter_rows():
        assert caption == current[shard.rsplit("/", 1)[-1]][f"{key}.txt"].decode().strip(), (shard, key)
    cleaned: dict[str, bytes] = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        cleaned.update(_members(tar.read_bytes()))
    everything = {name: data for members in current.values() for name, data in members.items()}
    assert len(cleaned) == len(everything)
    for name, data in cleaned.items():
        if name.endswith(".json"):  # the kept copy's JSON gains the scores under "bicro"
            data = json.dumps({k: v for k, v in json.loads(data).items() if k != "bicro"}).encode()
        assert data == everything[name], name


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_a_shard_edited_and_copied_with_cp_p_is_embedded_again(workdir: Path, runner: str) -> None:
    old, new = _shard("a", _captions("red")), _shard("a", _captions("tan"))
    assert len(old) == len(new)
    target, edited = workdir / "shards" / "a.tar", workdir / "edited.tar"
    _write(target, old, 1)
    _ok(_run(workdir, [str(target)], runner))
    _write(edited, new, 1)
    _cp_p(edited, target)  # same size, same mtime, same member headers: only the bytes differ
    _ok(_run(workdir, [str(target)], runner))
    _assert_fresh(workdir / "out", {"a.tar": new})


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(workdir: Path) -> Iterator[str]:
    """`python -m http.server` on the shards folder: Last-Modified from the file's mtime, no ETag."""
    handler = functools.partial(_QuietHandler, directory=str(workdir / "shards"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_a_shard_re_exported_behind_http_server_is_embedded_again(workdir: Path, served: str,
                                                                   runner: str) -> None:
    old, new = _shard("h", _captions("red")), _shard("h", _captions("tan"))
    target = workdir / "shards" / "h.tar"
    _write(target, old, 1_000_000)
    _ok(_run(workdir, [f"{served}/h.tar"], runner))
    _write(target, new, 2_000_000)  # the same size; a new Last-Modified
    _ok(_run(workdir, [f"{served}/h.tar"], runner))
    _assert_fresh(workdir / "out", {"h.tar": new})


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_an_edit_only_a_later_stage_sees_stops_the_run_then_a_rerun_is_fresh(workdir: Path, runner: str) -> None:
    old, new = _shard("m", _captions("red", long=True)), _shard("m", _captions("tan", long=True))
    other = _shard("o", _captions("red"))
    target, edited = workdir / "shards" / "m.tar", workdir / "edited.tar"
    _write(target, old, 1)
    _write(workdir / "shards" / "o.tar", other, 1)
    inputs = [str(workdir / "shards" / "*.tar")]
    _ok(_run(workdir, inputs, runner))
    embeddings = workdir / "out" / "embeddings"
    assert len(list(embeddings.glob("*.parquet"))) == 2
    _write(edited, new, 1)
    _cp_p(edited, target)  # only bytes in the middle of a long caption differ: the up-front identity is the same

    done = _run(workdir, inputs, runner, *_output_change())  # an output-only change: the write stage reads again
    assert done.returncode == 2, (done.stdout + done.stderr)[-4000:]
    line = f"input error: input shard {target} changed since it was embedded; rerun"
    assert done.stderr.count(line) == 1 and "Traceback" not in done.stderr, done.stderr[-4000:]
    assert [p.name.split("-")[0] for p in embeddings.glob("*.parquet")] == ["o"]  # m's cache is invalidated

    _ok(_run(workdir, inputs, runner, *_output_change()))
    _assert_fresh(workdir / "out", {"m.tar": new, "o.tar": other})
    (path,) = [p for p in embeddings.glob("*.parquet") if p.name.startswith("m-")]
    recorded = json.loads(pq.read_schema(path).metadata[b"bicro_clean"])["input"]
    assert recorded == {"sha256": hashlib.sha256(new).hexdigest(), "bytes": len(new), "complete": True}
