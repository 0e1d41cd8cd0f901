"""Prefect's own CLI against a real `prefect server start`: the list commands, `prefect deploy` with the repository's
prefect.yaml (asking nothing, in a terminal too, and exiting by itself), a process worker and a served deployment
each running the flow to `Completed` with the plain stages' bytes, and bad inputs failing a deployment run with
the CLI's one line as the flow run's state message and in `--watch`'s output. One server for the whole module;
every process started here runs in its own session and is killed with it at teardown, which checks that nothing
of it is left."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import TINY_BICRO, TINY_EMBED, session_processes
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.outlock import output_problem
from bicro_clean.pipeline.run import run_pipeline
from bicro_clean.pipeline.shards import InputError, expand_shard_spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]  # where prefect.yaml is
PREFECT = str(Path(sys.executable).parent / "prefect")
BICRO_CLEAN = str(Path(sys.executable).parent / "bicro-clean")
UUID = re.compile(r"UUID: ([0-9a-f-]{36})")
DEPLOYMENT = "clean-shards/process"  # prefect.yaml's process-pool deployment; `bicro-clean serve` serves .../local
DEPLOY_BOUND_S = 90  # `prefect deploy` takes ~5-10 s here; a prompt would wait forever


def _params(shards: str, out: Path) -> dict:
    return {"input": shards, "output": str(out), "embed": TINY_EMBED, "bicro": TINY_BICRO, "out": {"maxcount": 3}}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".locks" not in p.relative_to(root).parts}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Long-running Prefect processes (server, worker, serve), each in its own session, logged to a file."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env, self.started = logs, env, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-4000:]

    def stop(self, name: str) -> list[str]:
        """SIGTERM to the session, SIGKILL after 20 s; returns what was still alive after that (should be nothing)."""
        proc = self.started.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + 10
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [" ".join(p.cmdline()) for p in session_processes(proc.pid)]
        for p in session_processes(proc.pid):
            p.kill()
        return left


def _cli(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _ok(done: subprocess.CompletedProcess) -> str:
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in out and "Unprocessable" not in out, out[-4000:]  # 422s
    return out


def _wait_healthy(api: str, proc: subprocess.Popen, processes: Processes, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, processes.log("server")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("prefect server did not become healthy")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on a free loopback port, in a temporary PREFECT_HOME; workers and served deployments
    poll every 2 s (default 10-15) so runs start quickly."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "COLUMNS": "200"}  # COLUMNS: rich wraps no UUID
    processes = Processes(home / "logs", env)
    proc = processes.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)])
    try:
        _wait_healthy(api, proc, processes)
        yield processes
    finally:
        left = {name: processes.stop(name) for name in [*processes.started][::-1]}  # server last
    assert left == {name: [] for name in left}, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("cli-plain")
    run_pipeline(CleanConfig.model_validate(_params(str(tiny_shards / "*.tar"), out)))
    return _hashes(out)


@pytest.fixture(scope="module")
def worker(server):
    """clean-shards/process registered by `prefect --no-prompt deploy` from prefect.yaml (as a script runs it,
    within a bound), and a process worker polling its pool."""
    _ok(_cli(server.env, "work-pool", "create", "bicro-process", "--type", "process"))
    _ok(_cli(server.env, "--no-prompt", "deploy", "--name", "process", timeout=DEPLOY_BOUND_S))
    server.start("worker", [PREFECT, "worker", "start", "--pool", "bicro-process"])
    return server


def _in_a_terminal(env: dict[str, str], args: list[str], timeout: float) -> tuple[int | None, str, float]:
    """(exit code, None if it had not exited by `timeout`; what it printed; seconds) of `args` run in a pseudo
    terminal that never types anything: where Prefect's CLI prompts (it prompts only on a terminal), it waits."""
    master, slave = pty.openpty()
    start = time.monotonic()
    proc = subprocess.Popen(args, env={**env, "TERM": "xterm"}, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    printed = bytearray()
    try:
        while time.monotonic() - start < timeout:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: the terminal's other side is closed, the command is gone
                    chunk = b""
                printed += chunk
                if chunk:
                    continue
            if proc.poll() is not None:
                break
        code = proc.poll()
        return code, printed.decode(errors="replace"), time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)


def test_prefect_deploy_asks_nothing_in_a_terminal_and_exits(worker):
    """`prefect deploy --name process` as a user types it, in a terminal, without --no-prompt: prefect.yaml leaves
    Prefect nothing to ask (pull steps, schedules, build), so it registers the deployment and exits on its own.
    (The `worker` fixture ran the scripted `prefect --no-prompt deploy --name process` within the same bound.)"""
    code, printed, seconds = _in_a_terminal(worker.env, [PREFECT, "deploy", "--name", "process"], DEPLOY_BOUND_S)
    assert code == 0, (code, f"{seconds:.0f} s", printed[-3000:])
    assert f"Deployment '{DEPLOYMENT}' successfully created" in printed and "Would you like" not in printed, printed


def _run_deployment(env: dict[str, str], name: str, params: dict, watch: bool = True) -> tuple[str, str, int]:
    """(flow run id, CLI output, exit code) of `prefect deployment run NAME --params ...`."""
    args = ["deployment", "run", name, "--params", json.dumps({"config": params})]
    done = _cli(env, *args, *(["--watch", "--watch-timeout", "600"] if watch else []))
    output = done.stdout + done.stderr
    found = UUID.search(output)
    assert found, output[-4000:]
    return found.group(1), output, done.returncode


def _final_state(env: dict[str, str], run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(_ok(_cli(env, "flow-run", "inspect", run_id, "--output", "json")))["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(2)
    raise TimeoutError(f"flow run {run_id} never finished")


def test_a_process_worker_runs_the_deployed_flow_to_completion(worker, tiny_shards, reference, tmp_path):
    out = tmp_path / "out"
    _, output, code = _run_deployment(worker.env, DEPLOYMENT, _params(str(tiny_shards / "*.tar"), out))
    assert code == 0 and "Completed" in output, output[-3000:] + worker.log("worker")
    assert _hashes(out) == reference


def _bad_inputs(tmp_path: Path, tiny_shards: Path) -> dict[str, tuple[str, str, str]]:
    """case -> (input, output, the CLI's one line for it: `input error: ...`, `output error: ...`)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    good = str(tiny_shards / "*.tar")
    specs = {"no match": str(tmp_path / "none" / "*.tar"), "brace typo": str(tiny_shards / "{00000..00002.tar"),
             "empty folder": str(tmp_path / "empty")}
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        locked = tmp_path / "locked.tar"
        locked.write_bytes(b"x")
        locked.chmod(0)
        specs["unreadable"] = str(locked)
    cases = {}
    for case, spec in specs.items():
        with pytest.raises(InputError) as error:
            list(expand_shard_spec(spec))
        cases[case] = (spec, str(tmp_path / case.replace(" ", "-")), f"input error: {error.value}")
    for case, out in {"--out is a file": tmp_path / "afile", "--out under a file": tmp_path / "afile" / "sub"}.items():
        cases[case] = (good, str(out), f"output error: {output_problem(str(out))}")
    return cases


def test_bad_inputs_fail_a_worker_run_with_the_one_line_as_its_state_message(worker, tiny_shards, tmp_path):
    cases = _bad_inputs(tmp_path, tiny_shards)
    runs = {case: _run_deployment(worker.env, DEPLOYMENT, _params(spec, Path(out)), watch=False)[0]
            for case, (spec, out, _) in cases.items()}  # all queued at once: the worker runs them side by side
    spec, out, line = cases["no match"]  # and one watched as a user would: the line is in what --watch prints
    _, watched, code = _run_deployment(worker.env, DEPLOYMENT, _params(spec, Path(out + "-watched")))
    assert code == 1 and line in watched and "Failed" in watched.split(line)[1], watched[-3000:]
    for case, run_id in runs.items():
        state, expected = _final_state(worker.env, run_id), cases[case][2]
        assert state["type"] == "FAILED", (case, state)
        assert state["message"] == expected, (case, state["message"], expected)  # the line, nothing around it
        logs = _ok(_cli(worker.env, "flow-run", "logs", run_id))
        assert expected in logs and "Traceback" not in logs, (case, logs[-3000:])
    assert not (tmp_path / "afile").is_dir() and not list((tmp_path / "empty").iterdir())  # nothing written


def test_a_served_deployment_runs_and_a_bad_input_fails_in_the_watch(worker, tiny_shards, reference, tmp_path):
    """`bicro-clean serve` as documented (clean-shards/local, no work pool) beside prefect.yaml's worker deployment:
    each keeps its own name, so serving never takes over the worker's runs; `prefect deployment run --watch`."""
    server = worker
    server.start("serve", [BICRO_CLEAN, "serve"])
    deadline = time.monotonic() + 300
    while _cli(server.env, "deployment", "inspect", "clean-shards/local").returncode != 0:
        assert time.monotonic() < deadline, server.log("serve")
        time.sleep(2)
    pooled = _ok(_cli(server.env, "deployment", "inspect", DEPLOYMENT))
    assert "'work_pool_name': 'bicro-process'" in pooled, pooled  # still the worker's
    out = tmp_path / "out"
    _, output, code = _run_deployment(server.env, "clean-shards/local", _params(str(tiny_shards / "*.tar"), out))
    assert code == 0 and "Completed" in output, output[-3000:] + server.log("serve")
    assert _hashes(out) == reference
    spec = str(tmp_path / "none" / "*.tar")
    run_id, output, code = _run_deployment(server.env, "clean-shards/local", _params(spec, tmp_path / "bad"))
    line = f"input error: no shard matches {spec!r}"
    assert code != 0 and line in output and "Failed" in output, output[-3000:]
    assert _final_state(server.env, run_id)["message"] == line


def test_the_list_commands_answer(worker):
    """The commands that answered 422 with Prefect 3.8.8 and fastapi 0.152.0. Last in the module: they list the
    deployments, runs and artifacts the tests above made."""
    listed = _ok(_cli(worker.env, "deployment", "ls"))
    assert DEPLOYMENT in listed and "clean-shards/local" in listed, listed
    assert "completed" in _ok(_cli(worker.env, "flow-run", "ls")).lower()
    assert "clean-shards-summary" in _ok(_cli(worker.env, "artifact", "ls"))
