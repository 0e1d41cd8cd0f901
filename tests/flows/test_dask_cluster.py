"""A Dask cluster as a user starts one: `dask scheduler` and two ordinary `dask worker`s (each under a nanny, the
default) on loopback, the CLI run against it with `--dask-address` and the default embed settings (decode workers
on). Undisturbed, and with a worker process killed (-9) in embed, again in score and again in write (its nanny
starts a new one each time, the scheduler runs the lost group again), the run finishes with every data file
byte-identical to `--runner none`; the killed run's summary and manifest.json name each lost worker and the
shards that ran again, and manifest.json differs from the reference only by that `execution` record. After the
runs the workers, which outlive them, log no Prefect errors about the runs' temporary API servers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import TINY_BICRO, session_processes
from bicro_clean.pipeline.outlock import LOCK_DIR

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SHARDS, PAIRS = 8, 10
WORKERS = ("wA", "wB")
PREFECT_ERRORS = ("EventsWorker", "Unable to connect", "Error logging to API")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """8 shards of 10 photo-like 64-px JPEG pairs (lab.synthetic, as the scale study used) and their config: the
    tiny encoder with the default decode workers."""
    from bicro_clean.lab.synthetic import ShardSpec, write_shards

    root = tmp_path_factory.mktemp("cluster-data")
    write_shards(root / "shards", ShardSpec(pairs=SHARDS * PAIRS, shard_pairs=PAIRS, image_size=(64, 64),
                                            distinct_bytes=True, noise_rate=0.2))
    config = {"input": str(root / "shards" / "*.tar"),
              "embed": {"encoder": "tiny", "batch_size": 8, "progress": False}, "bicro": TINY_BICRO,
              "out": {"maxcount": 10}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "shards", root / "config.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


class Cluster:
    def __init__(self, root: Path) -> None:
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.root, self.procs, self.client = root, [], None

    def _start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.procs.append(subprocess.Popen([str(BIN / "dask"), *args], stdout=log, stderr=subprocess.STDOUT,
                                           env=_env(self.root / "home"), start_new_session=True))

    def start(self) -> "Cluster":
        from distributed import Client

        self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1],
                    "--no-dashboard")
        for name in WORKERS:  # ordinary workers: a nanny each, which restarts a killed worker process
            self._start(name, "worker", self.address, "--nthreads", "1", "--name", name, "--no-dashboard")
        self.client = Client(self.address, timeout=120)
        self.client.wait_for_workers(len(WORKERS), timeout=300)
        return self

    def workers(self) -> dict[str, dict]:
        return self.client.scheduler_info(n_workers=-1)["workers"]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        for proc in self.procs:
            with_children = session_processes(proc.pid)
            for child in with_children:
                child.kill()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


def _run(data: tuple[Path, Path], out: Path, *flags: str) -> subprocess.CompletedProcess:
    shards, config = data
    args = [str(BIN / "bicro-clean"), "run", "-c", str(config), "-o", str(out), *flags]
    return subprocess.run(args, env=_env(out.parent / "home"), capture_output=True, text=True, timeout=1200)


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every output file but the advisory lock files and the manifest (compared as JSON)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != LOCK_DIR and p.name != "manifest.json"}


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    done = _run(data, out, "--runner", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_nanny_workers_with_default_settings_match_runner_none(data, cluster, reference, tmp_path):
    out = tmp_path / "out"
    done = _run(data, out, "--runner", "dask", "--dask-address", cluster.address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _hashes(out) == _hashes(reference) and _manifest(out) == _manifest(reference)
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    # the stage lines count what the workers did (they used to say "all shards cached" here)
    assert f"embed    {SHARDS} shards, {SHARDS * PAIRS} pairs" in done.stderr
    assert f"write    {SHARDS} shards" in done.stderr and "lost " not in done.stdout
    second = _run(data, out, "--runner", "dask", "--dask-address", cluster.address)  # the same workers, a new server
    assert second.returncode == 0 and "embed    all shards cached" in second.stderr
    assert f"score    {SHARDS} shards, {SHARDS} cached" in second.stderr
    time.sleep(5)  # what a worker still held for a gone server would fail within this
    for name in WORKERS:
        log = cluster.log(name)
        assert not [e for e in PREFECT_ERRORS if e in log], log[-3000:]


def _kill_a_worker_in_each_stage(cluster: Cluster, killed: list[dict], stop: threading.Event) -> None:
    """Watch the scheduler; the first time a worker runs an embed group, kill its worker process (not its nanny,
    which starts a new one); then the same in score, then in write."""
    stages = ["embed", "score", "write"]
    while stages and not stop.is_set():
        for address, keys in cluster.client.processing().items():
            if any(str(key).startswith(f"{stages[0]}-") for key in keys):
                pid = cluster.client.run(os.getpid, workers=[address])[address]
                killed.append({"stage": stages.pop(0), "name": cluster.workers()[address]["name"], "pid": pid,
                               "address": address,
                               "children": [p.pid for p in psutil.Process(pid).children(recursive=True)]})
                os.kill(pid, signal.SIGKILL)
                break
        time.sleep(0.02)


def test_a_worker_killed_in_each_stage_changes_no_byte_and_is_reported(data, cluster, reference, tmp_path):
    out, killed, stop = tmp_path / "out", [], threading.Event()
    watcher = threading.Thread(target=_kill_a_worker_in_each_stage, args=(cluster, killed, stop), daemon=True)
    watcher.start()
    try:
        done = _run(data, out, "--runner", "dask", "--dask-address", cluster.address)
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert [k["stage"] for k in killed] == ["embed", "score", "write"], killed
    assert done.returncode == 0, done.stderr[-3000:]
    assert _hashes(out) == _hashes(reference)
    record = _manifest(out)
    execution = record.pop("execution")
    assert record == _manifest(reference)  # the manifest differs only by what happened to the run
    for kill in killed:
        lost = [w for w in execution["lost_workers"] if w["worker"] == kill["address"]]
        assert lost and lost[0]["name"] == kill["name"] and lost[0]["stage"] == kill["stage"] and lost[0]["shards"]
        assert set(lost[0]["shards"]) <= set(execution["retries"][kill["stage"]]["shards"])
        assert (f"lost     worker {kill['name']} in {kill['stage']}: shards {', '.join(lost[0]['shards'])} ran again"
                in done.stdout), done.stdout
    time.sleep(6)  # torch's decode workers notice their parent is gone within 5 s
    orphans = [p for k in killed for p in k["children"]
               if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not orphans
