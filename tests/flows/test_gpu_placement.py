"""GPU placement: which Ray tasks request a GPU, and the warning for Dask workers of one host sharing one GPU.

No GPU is needed: the decisions are plain functions, and the Ray run declares one logical GPU (`ray.init(num_gpus=1)`
on a CPU machine), which Ray schedules exactly as a real one; the tasks then run on the CPU (device auto)."""

from __future__ import annotations

import logging
import os

import pytest

from conftest import TINY_BICRO, TINY_EMBED
from bicro_clean.flows.runners import _gpu_of_worker, ray_gpus_per_task, shared_gpus, warn_shared_gpus
from bicro_clean.models.devices import DeviceUnavailableError
from bicro_clean.pipeline import progress
from bicro_clean.pipeline.config import CleanConfig


@pytest.mark.parametrize("device, cluster_gpus, wanted", [
    ("cuda", 4, 1), ("cuda:0", 1, 1), ("auto", 2, 1), ("auto", 0.5, 1),  # a fractional GPU resource still counts
    ("auto", 0, 0), ("cpu", 8, 0), ("mps", 8, 0),
])
def test_model_stages_request_a_gpu_when_the_run_can_use_one(device, cluster_gpus, wanted):
    assert ray_gpus_per_task(device, cluster_gpus) == wanted


@pytest.mark.parametrize("device, cluster_gpus, says", [
    ("cuda", 0, "the Ray cluster has no GPU"),  # Ray would keep the task pending for ever
    ("cuda:1", 0, "the Ray cluster has no GPU"),
    ("cuda:1", 4, "use device cuda"),  # the task sees only its one GPU, as cuda:0
])
def test_a_gpu_request_that_could_never_run_fails_with_one_line(device, cluster_gpus, says):
    with pytest.raises(DeviceUnavailableError, match=says) as caught:
        ray_gpus_per_task(device, cluster_gpus)
    assert f"device {device} was asked for" in str(caught.value) and "\n" not in str(caught.value)


def test_workers_of_one_host_on_the_same_gpu_are_named():
    plain = {"tcp://a:1": ("a", 4, "0"), "tcp://a:2": ("a", 4, "0")}  # dask worker --nworkers 2: both on cuda:0
    dask_cuda = {"tcp://b:1": ("b", 2, "0"), "tcp://b:2": ("b", 2, "1")}  # rotated CUDA_VISIBLE_DEVICES per worker
    one_gpu_each = {"tcp://c:1": ("c", 1, "0"), "tcp://c:2": ("c", 1, "1")}  # CUDA_VISIBLE_DEVICES=0 / =1
    two_hosts = {"tcp://d:1": ("d", 2, "0"), "tcp://e:1": ("e", 2, "0")}
    cpu_only = {"tcp://f:1": ("f", 0, ""), "tcp://f:2": ("f", 0, "")}
    assert shared_gpus({**plain, **dask_cuda, **one_gpu_each, **two_hosts, **cpu_only}) == ["tcp://a:1", "tcp://a:2"]


class _Client:
    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def run(self, function):
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_the_warning_names_dask_cuda_worker(caplog):
    client = _Client({"tcp://a:1": ("a", 2, "0"), "tcp://a:2": ("a", 2, "0")})
    with caplog.at_level(logging.WARNING, logger="bicro_clean.flows.runners"):
        assert warn_shared_gpus(client, "auto") == ["tcp://a:1", "tcp://a:2"]
    assert "dask cuda worker" in caplog.text and "tcp://a:2" in caplog.text
    assert warn_shared_gpus(client, "cpu") == [] and client.calls == 1  # a CPU run does not ask the workers
    assert warn_shared_gpus(_Client(OSError("worker gone")), "cuda") == []  # advice only: never stops a run


def test_the_question_runs_on_dask_workers(caplog):
    """The probe itself, on a real LocalCluster of this CPU machine: no GPU seen, nothing shared, no warning."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, \
            distributed.Client(cluster) as client, caplog.at_level(logging.WARNING):
        assert warn_shared_gpus(client, "auto") == []
        assert [count for _, count, _ in client.run(_gpu_of_worker).values()] == [0, 0]
    assert "dask cuda worker" not in caplog.text


@pytest.mark.slow
def test_ray_model_stages_request_the_clusters_gpu(tiny_shards, tmp_path, monkeypatch):
    """A Ray cluster with a GPU (one logical GPU here): embed, fit and score are submitted with num_gpus=1, the
    other stages with none, and the run completes (a request Ray could not place would wait for ever)."""
    pytest.importorskip("prefect_ray", reason="the Ray runner's extra: pip install 'bicro-clean[ray]'")
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import RemoteOptionsContext

    from bicro_clean.flows import runners
    from bicro_clean.flows.clean_shards import run_flow

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(runners, "_ray_runner", lambda config: RayTaskRunner(
        init_kwargs={"address": "local", "num_gpus": 1}))  # a new Ray, never a cluster started on this machine
    asked: dict[str, set] = {}
    submit = RayTaskRunner.submit

    def recording_submit(self, task, *args, **kwargs):
        options = RemoteOptionsContext.get().current_remote_options
        asked.setdefault(task.name, set()).add(options.get("num_gpus", 0))
        return submit(self, task, *args, **kwargs)

    monkeypatch.setattr(RayTaskRunner, "submit", recording_submit)
    embed = {k: v for k, v in TINY_EMBED.items() if k != "num_workers"}  # default decode workers
    config = CleanConfig.model_validate({"input": str(tiny_shards / "*.tar"), "output": str(tmp_path / "out"),
                                         "embed": embed, "bicro": TINY_BICRO, "runner": {"kind": "ray"}})
    shown = []  # what the CLI's display is told: the fit's line comes from the GPU task's reports

    class Display:
        def report(self, stage, advance, total, items):
            shown.append((stage, total, items))

        def stage_done(self, *args):
            pass

    previous = progress.install(Display())
    try:
        summary = run_flow(config)
    finally:
        progress.install(previous)
    fit_lines = [(total, items > 0) for stage, total, items in shown if stage == "fit" and total]
    assert fit_lines == [(TINY_BICRO["epochs"], True)]  # epochs and fitted pairs, as when the fit runs here
    assert {stage: asked.pop(stage) for stage in ("embed", "fit", "score")} == {"embed": {1}, "fit": {1}, "score": {1}}
    assert "write" in asked and all(gpus == {0} for gpus in asked.values())  # write and any other mapped task: none
    assert summary["shards"] == 4 and summary["in"] == summary["kept"] + summary["dropped"] + summary["errors"]
    assert os.path.exists(tmp_path / "out" / "manifest.json")


def test_a_worker_without_the_asked_for_gpu_ends_the_run_with_one_line(tiny_shards, tmp_path, monkeypatch):
    """The driver has the device (its up-front check passes), a worker does not: the task's DeviceUnavailableError
    reaches the CLI, which prints it as one line and exits 2, as the up-front check would."""
    from typer.testing import CliRunner

    from bicro_clean import cli

    def worker_without_gpu(cfg):
        raise DeviceUnavailableError("device cuda was asked for, but this machine has no usable CUDA device")

    monkeypatch.setattr(cli, "run_with_runner", worker_without_gpu)
    result = CliRunner().invoke(cli.app, ["run", "--input", str(tiny_shards / "*.tar"), "--out",
                                          str(tmp_path / "out"), "--encoder", "tiny"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["device error: device cuda was asked for, but this machine has no usable CUDA device"]
