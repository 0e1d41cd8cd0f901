"""Crash safety: SIGKILL a run anywhere, start it again, and get the uninterrupted run's bytes.

Every kill is anchored on progress, not on wall time (imports take seconds and vary with machine load): the
test watches the output folder and kills the process group once the run has published its k-th final-named
file, plus a small seeded delay, so kills land inside a chosen stage and also mid-write. Kills are chained:
the rerun after a kill is itself killed at a later anchor, and so on, before a last rerun runs to completion
and is compared file by file (sha256) with an uninterrupted run. Right after every kill, every final-named file
must be complete (a crash may only leave `.tmp-*` files behind) and every result/manifest hash must match the
file it names.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from bicro_clean.pipeline.layout import RUN_CONFIG
from bicro_clean.pipeline.outlock import LOCK_DIR

from conftest import TINY_BICRO, TINY_EMBED

BIN = Path(sys.executable).parent
TMP_PREFIX = ".tmp-"  # pipeline.parquet_io.atomic_output names its temp files so
STAGES = ("embed", "fit", "score", "write", "finalize")
STAGE_OF_DIR = {"embeddings": "embed", "checkpoint": "fit", "scores": "score", "annotated": "write",
                "filtered": "write", "shards": "write", "results": "write"}
SEED = 20240611
CHAINS = 2  # x 11 kills (AIMS) + 1 startup kill = 23 kill points, chained: 2 + 23 process starts
# What users and downstream jobs glob (README: pl.scan_parquet("out/annotated/*.parquet")). fsspec and polars
# globs match dot files too, so a temp file a crash leaves must not end like a final file.
FINAL_GLOBS = ("embeddings/*.parquet", "scores/*.parquet", "annotated/*.parquet", "filtered/*.parquet",
               "shards/*.tar", "shards/*.json", "results/*.json", "*.parquet", "*.json", "*.html")


# ---------------------------------------------------------------- running the CLI


def _write_config(tmp: Path, shards: Path, out: Path, runner: str) -> Path:
    config = {"input": str(shards / "*.tar"), "output": str(out),
              "embed": TINY_EMBED, "bicro": TINY_BICRO, "out": {"maxcount": 3}, "runner": {"kind": runner}}
    path = tmp / f"{out.name}-{runner}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(prefect_home: Path) -> dict[str, str]:
    """Ephemeral Prefect in a private home: never the developer's database or a configured server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _command(config: Path) -> list[str]:
    return [str(BIN / "bicro-clean"), "run", "-c", str(config)]


def _run_to_completion(config: Path, env: dict[str, str], log: Path) -> None:
    with open(log, "w") as err:
        done = subprocess.run(_command(config), check=False, env=env, stdout=subprocess.DEVNULL, stderr=err,
                              timeout=600)
    assert done.returncode == 0, log.read_text()[-4000:]


# ---------------------------------------------------------------- looking at the output folder


# A write's hand-over to the pack step (shards/.parts/<shard_id>.tar, .parquet, .json): complete files, removed
# once packed, so they are not progress; only each shard's index stays (pipeline/parts.py).
HAND_OVER = os.path.join("shards", ".parts") + os.sep


def _hand_over(rel: str) -> bool:
    return rel.startswith(HAND_OVER) and not rel.endswith(".index.parquet")


def _files(root: Path, hand_over: bool = False) -> tuple[set[str], set[str]]:
    """(final-named files, temp files) under root, as relative paths; `hand_over`: the final-named files are the
    write stage's hand-over files instead."""
    final, temp = set(), set()
    for folder, _, names in os.walk(root):
        if os.path.relpath(folder, root).split(os.sep)[0] == LOCK_DIR:  # empty advisory lock files, not outputs
            continue
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if rel == RUN_CONFIG:  # the folder's owner record: written once, before any stage, so not progress
                continue
            if name.startswith(TMP_PREFIX):
                temp.add(rel)
            elif _hand_over(rel) == hand_over:
                final.add(rel)
    return final, temp


def _hashes(root: Path) -> dict[str, str]:
    final, _ = _files(root)
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in sorted(final)}


def _stage_of(rel: str) -> str:
    return STAGE_OF_DIR.get(rel.split(os.sep, 1)[0], "finalize") if os.sep in rel else "finalize"


# ---------------------------------------------------------------- completeness of what a kill left


def _check_parquet(path: Path) -> None:
    pq.read_table(path)  # footer and every page: a cut file raises


def _check_tar(path: Path) -> None:
    data = path.read_bytes()
    # tarfile happily reads an archive cut at a member boundary, so also require the end-of-archive blocks
    assert len(data) % tarfile.BLOCKSIZE == 0 and data.endswith(b"\0" * 2 * tarfile.BLOCKSIZE), path
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            tar.extractfile(member).read()


def _check_safetensors(path: Path) -> None:
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    assert len(data) == 8 + header_len + end, path


def _check_html(path: Path) -> None:
    assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), path


CHECKS: dict[str, Callable[[Path], None]] = {
    ".parquet": _check_parquet, ".tar": _check_tar, ".json": lambda p: json.loads(p.read_bytes()),
    ".safetensors": _check_safetensors, ".html": _check_html,
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_recorded_hashes(root: Path, final: set[str]) -> None:
    """A per-shard result or the manifest is written last: every file it names exists with that hash."""
    records = [r for r in final if r.startswith("results" + os.sep)]
    records += ["manifest.json"] if "manifest.json" in final else []
    for rel in records:
        for output in json.loads((root / rel).read_bytes())["outputs"]:
            assert _sha(root / output["path"]) == output["sha256"], f"{rel} names {output['path']}"


def assert_no_partial_final_files(root: Path) -> None:
    final, _ = _files(root)
    for rel in sorted(final | _files(root, hand_over=True)[0]):
        CHECKS[Path(rel).suffix](root / rel)
    checkpoints = {Path(rel).parent for rel in final if _stage_of(rel) == "fit"}
    for folder in checkpoints:  # model.json is copied last and marks the folder complete
        if (root / folder / "model.json").exists():
            assert (root / folder / "tensors.safetensors").exists(), folder
    _check_recorded_hashes(root, final)


def assert_globs_see_only_final_files(root: Path) -> None:
    fs = fsspec.filesystem("file")
    for pattern in FINAL_GLOBS:
        hits = [Path(hit).name for hit in fs.glob(str(root / pattern))]
        assert not [h for h in hits if h.startswith(TMP_PREFIX)], f"{pattern} matches a temp file: {hits}"


# ---------------------------------------------------------------- kill points


@dataclass(frozen=True)
class KillPoint:
    aim: str  # stage the anchor aims at (the observed stage is recorded separately)
    after_files: int  # kill once this many final-named files exist (0: no anchor, only the delay)
    delay_s: float
    mid_write: bool = False  # ... and, once there, as soon as this process has a temp file open (no delay)
    last_anchor: int = 0  # past this many files the aimed stage is over: the point is skipped


@dataclass
class Kill:
    point: KillPoint
    stage: str  # the stage the run was in when it died, from what it left
    final: int
    temp: list[str] = field(default_factory=list)  # temp files this process left (it died mid-write)


# Kills per chain and stage (+1 startup kill in chain 0). Most go where most files are written.
AIMS = {"embed": 2, "fit": 1, "score": 2, "write": 5, "finalize": 1}


def _progress_counts(reference: dict[str, str]) -> dict[str, int]:
    return Counter(_stage_of(rel) for rel in reference)


def _anchors(stage: str, n: int, counts: dict[str, int], rng: random.Random) -> list[KillPoint]:
    """`n` kill points inside `stage`, after distinct numbers of its files (fit: after the embeddings).

    Delays are short next to a stage's length on this data (embed ~20 ms a shard, fit ~300 ms, score and write
    ~15 ms a shard, report ~100 ms), so where a kill lands is decided by the anchor, the delay only varies it.
    """
    before = sum(counts[s] for s in STAGES[:STAGES.index(stage)])
    last = before + counts[stage] - 1
    if stage == "fit":  # two files copied at the very end: the anchor is the stage before
        return [KillPoint(stage, before, rng.uniform(0.0, 0.2), last_anchor=last) for _ in range(n)]
    first = before + (1 if stage == "embed" else 0)  # 0 files of embed = the startup kill, planned apart
    max_delay = 0.06 if stage == "finalize" else 0.005  # the report takes ~100 ms after the manifest
    # Half the kills wait for a temp file: a write cut in the middle.
    return [KillPoint(stage, k, rng.uniform(0.0, max_delay), rng.random() < 0.5, last)
            for k in rng.sample(range(first, last + 1), n)]


def kill_chain(chain: int, counts: dict[str, int]) -> list[KillPoint]:
    """One chain's kills in progress order, seeded by the chain number."""
    rng = random.Random(SEED + chain)
    points = sorted((p for stage, n in AIMS.items() for p in _anchors(stage, n, counts, rng)),
                    key=lambda p: (STAGES.index(p.aim), p.after_files))
    if chain == 0:
        points.insert(0, KillPoint("startup", 0, rng.uniform(0.5, 3.0)))  # dies while importing
    return points


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group: Prefect's temporary API server is a child process
    except ProcessLookupError:
        pass
    proc.wait()


def _reached(root: Path, count: int, old_temp: set[str] | None) -> bool:
    final, temp = _files(root)
    return len(final) >= count and (old_temp is None or bool(temp - old_temp))


def _wait_for(proc: subprocess.Popen, root: Path, count: int, old_temp: set[str] | None,
              timeout: float = 600) -> None:
    """Until `count` final files exist (and, given `old_temp`, a temp file not in it) or the process ends."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not _reached(root, count, old_temp):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run never reached {count} files")
        time.sleep(0.0005)


def _target(point: KillPoint, start_files: int) -> int | None:
    """Files to wait for; an anchor an earlier kill overshot moves to this process's next file, or is skipped
    once its stage is over (starting a run only to see it finish costs seconds and tests nothing new)."""
    if not point.after_files:
        return 0
    target = max(point.after_files, start_files + 1)
    return target if target <= point.last_anchor + 1 and start_files <= point.last_anchor else None


def run_and_kill(config: Path, env: dict[str, str], root: Path, point: KillPoint, log: Path,
                 reference: set[str]) -> Kill | None:
    """Start the run, SIGKILL it at `point`, and record what it left (None: skipped, its stage is done)."""
    start_final, start_temp = _files(root)
    target = _target(point, len(start_final))
    if target is None:
        return None
    with open(log, "w") as err:
        proc = subprocess.Popen(_command(config), env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            _wait_for(proc, root, target, start_temp if point.mid_write else None)
            time.sleep(0.0 if point.mid_write else point.delay_s)
            finished = proc.poll() is not None
        finally:
            _killpg(proc)
    assert not finished or proc.returncode == 0, log.read_text()[-4000:]
    final, temp = _files(root)
    return Kill(point, "finished" if finished else _stage_at_kill(final, temp, reference), len(final),
                sorted(temp - start_temp))


def _stage_at_kill(final: set[str], temp: set[str], reference: set[str]) -> str:
    if not final and not temp:
        return "startup"
    missing = reference - final
    return next((s for s in STAGES if any(_stage_of(rel) == s for rel in missing)), "finalize")


def _coverage_table(kills: list[Kill]) -> str:
    rows = [f"{k.point.aim:>8} after {k.point.after_files:2d} files "
            f"{'+ temp file   ' if k.point.mid_write else f'+{k.point.delay_s * 1000:6.1f} ms'} -> "
            f"{k.stage:8} ({k.final} final files, temp: {', '.join(k.temp) or '-'})" for k in kills]
    return "\n".join(rows)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def reference(tiny_shards, workdir) -> dict[str, str]:
    """sha256 of every file of one uninterrupted CLI run (`--runner none`), the bytes every resume must give."""
    out = workdir / "reference"
    config = _write_config(workdir, tiny_shards, out, "none")
    _run_to_completion(config, _env(workdir / "prefect-home"), workdir / "reference.log")
    assert not _files(out)[1], "an uninterrupted run leaves no temp file"
    _assert_samples_accounted(out)
    return _hashes(out)


def _inputs(root: Path) -> int:
    return json.loads((root / "manifest.json").read_text())["counts"]["in"]


def _assert_samples_accounted(root: Path) -> None:
    """No lost or duplicated sample: unique keys across cleaned tars, as many as kept rows and keep_keys."""
    keys = []
    for tar_path in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    manifest = json.loads((root / "manifest.json").read_text())
    annotated = sum(pq.read_metadata(p).num_rows for p in (root / "annotated").glob("*.parquet"))
    keep_keys = pq.read_metadata(root / "keep_keys.parquet").num_rows
    assert len(keys) == len(set(keys)) == manifest["counts"]["kept"] == keep_keys
    assert annotated == manifest["counts"]["in"] == sum(
        json.loads(p.read_text())["count"] for p in (root / "shards").glob("*_stats.json"))


# ---------------------------------------------------------------- tests


@pytest.mark.slow
def test_killed_plain_runs_resume_to_identical_outputs(tiny_shards, workdir, reference, capsys):
    counts = _progress_counts(reference)
    kills: list[Kill] = []
    leftovers = {}
    for chain in range(CHAINS):
        out = workdir / f"chain{chain}"
        config = _write_config(workdir, tiny_shards, out, "none")
        env = _env(workdir / "prefect-home")
        for i, point in enumerate(kill_chain(chain, counts)):
            kill = run_and_kill(config, env, out, point, workdir / f"chain{chain}-{i}.log", set(reference))
            if kill is None:
                continue
            kills.append(kill)
            assert_no_partial_final_files(out)
            assert_globs_see_only_final_files(out)
        temp_before = _files(out)[1]
        _run_to_completion(config, env, workdir / f"chain{chain}-final.log")
        final_hashes, temp_after = _hashes(out), _files(out)[1]
        assert final_hashes == reference, f"chain {chain} differs after resume:\n{_coverage_table(kills)}"
        assert temp_after <= temp_before, "a run that completes leaves no temp file of its own"
        assert_globs_see_only_final_files(out)
        assert pl.scan_parquet(str(out / "annotated" / "*.parquet")).collect().height == _inputs(out)
        leftovers[chain] = len(temp_after)
    table = _coverage_table(kills)
    with capsys.disabled():
        print(f"\nkill points (chains of {CHAINS}; leftover temp files per chain: {leftovers}):\n{table}")
    real = [k for k in kills if k.stage != "finished"]
    assert len(real) >= 20, table
    assert set(STAGES) <= {k.stage for k in real}, f"a stage without a kill:\n{table}"


@pytest.mark.slow
def test_killed_flow_run_resumes_to_identical_outputs(tiny_shards, workdir, reference, capsys):
    """The same through the Prefect flow (`--runner local`, threads): killed while shards are being written."""
    out = workdir / "flow"
    config = _write_config(workdir, tiny_shards, out, "local")
    env = _env(workdir / "flow-prefect-home")
    counts = _progress_counts(reference)
    before = sum(counts[s] for s in STAGES[:STAGES.index("write")])
    # Killed just after the first write output: the other shard's write task is mid-way on the second thread.
    point = KillPoint("write", before + 1, 0.0, last_anchor=before + counts["write"] - 1)
    kill = run_and_kill(config, env, out, point, workdir / "flow-kill.log", set(reference))
    assert kill.stage not in ("finished", "startup"), _coverage_table([kill])
    assert_no_partial_final_files(out)
    assert_globs_see_only_final_files(out)
    _run_to_completion(config, env, workdir / "flow-final.log")
    assert _hashes(out) == reference
    with capsys.disabled():
        print(f"\nflow kill: {_coverage_table([kill])}")
