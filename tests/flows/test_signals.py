"""Issue 16 items 5 and 6: Ctrl-C (SIGINT to the process group, as a terminal sends it) and SIGTERM (to the process,
as `kill`, systemd and `docker stop` send it) stop `bicro-clean run` within 5 s with exit code 130 / 143, under the
default Prefect runner and under `--runner none`, during embed and during fit; no process of the run survives
(the temporary API server, decode workers); and the same command again finishes with the bytes of an
uninterrupted run. Here, under tests/flows, because it runs Prefect flows (in subprocesses)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from bicro_clean.pipeline.outlock import LOCK_DIR
from conftest import TINY_BICRO, numbered_shards, session_processes

BIN = Path(sys.executable).parent
SHARDS = 8
STOP_WITHIN_S = 5.0
# Decode workers on (num_workers 1): their processes must go too. Small batches: embed lasts long enough to be
# caught in the middle on any machine; 4 epochs: fit too.
EMBED = {"encoder": "tiny", "num_workers": 1, "batch_size": 4, "progress": False}
BICRO = {**TINY_BICRO, "epochs": 4}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 shards of 30 pairs (120 images x 2 captions, 25% caption noise)."""
    return numbered_shards(tmp_path_factory.mktemp("signal-data"), 120, (32, 32), shard_size=30)


def _config(shards: Path, out: Path, runner: str) -> Path:
    config = {"input": str(shards / "*.tar"), "output": str(out), "embed": EMBED, "bicro": BICRO,
              "runner": {"kind": runner}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(home: Path) -> dict[str, str]:
    """Prefect's temporary API server in a private home, never a configured server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every output, as tests/e2e/test_resume.py compares them: without the empty advisory lock files and
    the `.tmp-*` files a stopped write may leave (nothing reads them)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] != LOCK_DIR and not path.name.startswith(".tmp-"):
            found[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _run(config: Path, env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    """Run to the end in its own session; nothing of it (the temporary API server) may outlive it."""
    args = [str(BIN / "bicro-clean"), "run", "-c", str(config)]
    with open(log, "w") as err:
        proc = subprocess.Popen(args, env=env, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
        code = proc.wait(timeout=900)
    left = session_processes(proc.pid)
    assert left == [], f"left behind: {[p.cmdline() for p in left]}"
    return subprocess.CompletedProcess(args, code)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("signal-reference")
    out = work / "out"
    done = _run(_config(shards, out, "none"), _env(work / "home"), work / "run.log")
    assert done.returncode == 0, (work / "run.log").read_text()[-3000:]
    return _hashes(out)


def _embedded(out: Path) -> int:
    return len(list((out / "embeddings").glob("*.parquet"))) if (out / "embeddings").is_dir() else 0


def _fitted(out: Path) -> bool:
    return any((out / "checkpoint").rglob("model.json")) if (out / "checkpoint").is_dir() else False


def _wait_until(proc: subprocess.Popen, log: Path, reached, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not reached():
        assert proc.poll() is None, f"the run ended before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.005)


def _embed_done(log: Path) -> bool:
    """The embed stage's line ("embed    8 shards, ..." or "embed    all shards cached") is printed: fit runs."""
    return re.search(r"^embed {2,}", log.read_text(), re.MULTILINE) is not None


def _stop_at(stage: str, signum: int, runner: str, config: Path, env: dict[str, str], out: Path, log: Path) -> str:
    """Start the run, send `signum` once it is inside `stage`, check how it ended; returns its log."""
    before = _embedded(out)
    inside = {"embed": lambda: before < _embedded(out) < SHARDS,  # a shard written, others still to do
              "fit": lambda: _embed_done(log)}[stage]
    with open(log, "w") as err:
        proc = subprocess.Popen([str(BIN / "bicro-clean"), "run", "-c", str(config)], env=env, stdout=err,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(proc, log, inside, f"{stage} ({signal.Signals(signum).name})")
        children = psutil.Process(proc.pid).children(recursive=True)
        sent = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # a terminal's Ctrl-C reaches every process of the foreground group
        else:
            os.kill(proc.pid, signum)  # kill, systemd, docker stop: the main process only
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
        survivors = session_processes(proc.pid)
    finally:
        if proc.poll() is None or session_processes(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)  # never leave a stray run behind a failed test
            proc.wait()
    text = log.read_text()
    name = signal.Signals(signum).name
    assert code == 128 + signum, f"{name} in {stage}: exit {code}\n{text[-3000:]}"
    assert took < STOP_WITHIN_S, f"{name} in {stage}: took {took:.1f} s\n{text[-3000:]}"
    assert survivors == [], f"{name} in {stage}: left {[(p.pid, p.cmdline()) for p in survivors]}"
    assert f"{name}: stopped" in text
    assert stage != "fit" or not _fitted(out), "the stop came after fit had finished"
    if runner != "none" or stage == "embed":  # the API server; the decode worker
        assert children, "the run had started its child processes when it was stopped"
    return text


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["local", "none"])
def test_sigint_and_sigterm_stop_the_run_and_a_rerun_gives_the_same_bytes(runner, shards, reference, tmp_path):
    """One chain of stops per runner: SIGINT then SIGTERM in embed (a later shard each time), SIGTERM then SIGINT in
    fit, then the same command runs to completion."""
    out = tmp_path / "out"
    config, env = _config(shards, out, runner), _env(tmp_path / "home")
    stops = [("embed", signal.SIGINT), ("embed", signal.SIGTERM), ("fit", signal.SIGTERM), ("fit", signal.SIGINT)]
    for i, (stage, signum) in enumerate(stops):
        _stop_at(stage, signum, runner, config, env, out, tmp_path / f"stop{i}.log")
    done = _run(config, env, tmp_path / "final.log")
    assert done.returncode == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert _hashes(out) == reference
