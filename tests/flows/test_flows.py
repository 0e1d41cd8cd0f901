"""The clean-shards flow: same outputs as the plain stages, on threads, on Dask, and through a served deployment."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_BICRO, TINY_EMBED
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.run import run_pipeline

BIN = Path(sys.executable).parent


def _params(shards: Path, out: Path) -> dict:
    return {"input": str(shards / "*.tar"), "output": str(out),
            "embed": TINY_EMBED, "bicro": TINY_BICRO, "out": {"maxcount": 3}}


def _hashes(root: Path) -> dict[str, str]:
    skip = {"report.html"}  # compared separately: same bytes too, but absent when no report module
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    run_pipeline(CleanConfig.model_validate(_params(tiny_shards, out)))
    return _hashes(out)


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    """An isolated Prefect home for the ephemeral API, so tests never touch the user's database."""
    home = tmp_path_factory.mktemp("prefect-home")
    old = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)
    yield home
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.slow
def test_flow_on_threads_matches_plain_stages(tiny_shards, tmp_path, reference, prefect_home):
    from bicro_clean.flows.clean_shards import run_flow

    config = CleanConfig.model_validate({**_params(tiny_shards, tmp_path), "runner": {"kind": "local"}})
    summary = run_flow(config)
    assert summary["in"] == summary["kept"] + summary["dropped"] + summary["errors"]
    assert _hashes(tmp_path) == reference


@pytest.mark.slow
def test_flow_on_dask_local_cluster_matches_local(tiny_shards, tmp_path, reference, prefect_home):
    from bicro_clean.flows.clean_shards import run_flow

    config = CleanConfig.model_validate({**_params(tiny_shards, tmp_path),
                                         "runner": {"kind": "dask", "workers": 2}})
    run_flow(config)
    assert _hashes(tmp_path) == reference


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited early: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("prefect server did not become healthy")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_deployment(env: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "clean-shards/local"],
                               env=env, capture_output=True, text=True)
        if found.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError("deployment clean-shards/local never appeared")


@pytest.mark.slow
def test_served_deployment_runs_to_completion(tiny_shards, tmp_path, reference):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)
    served = None
    try:
        _wait_healthy(api, server)
        served = subprocess.Popen([str(BIN / "bicro-clean"), "serve"], env=env,
                                  stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT)
        _wait_deployment(env)
        out = tmp_path / "out"
        params = json.dumps({"config": _params(tiny_shards, out)})
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "clean-shards/local", "--params", params,
                              "--watch", "--watch-timeout", "600"], env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, run.stdout + run.stderr + (logs / "serve.log").read_text()[-3000:]
        assert "Completed" in run.stdout
        assert _hashes(out) == reference
    finally:
        for proc in (served, server):
            if proc is not None:
                _stop(proc)


def test_bad_config_is_rejected_before_any_work(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="input"):
        CleanConfig.model_validate({"output": str(tmp_path)})
    assert not any(tmp_path.iterdir())
    assert shutil.which("prefect", path=str(BIN)), "prefect CLI is installed with the package"
