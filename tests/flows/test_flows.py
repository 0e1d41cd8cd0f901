"""The clean-shards flow: same outputs as the plain stages, on threads, on a Dask LocalCluster and on Ray, with the
default embed settings (decode workers on, which Dask's daemonic worker processes used to refuse). Against a real
server (prefect deploy, a process worker, a served deployment, the list commands): test_prefect_cli.py; against a
`dask scheduler` with nanny workers, killed workers included: test_dask_cluster.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import TINY_BICRO, TINY_EMBED
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.run import run_pipeline

BIN = Path(sys.executable).parent


# The tiny encoder with the default decode workers (every core): runner paths are tested as users run them.
EMBED = {k: v for k, v in TINY_EMBED.items() if k != "num_workers"}


def _params(shards: Path, out: Path) -> dict:
    return {"input": str(shards / "*.tar"), "output": str(out),
            "embed": EMBED, "bicro": TINY_BICRO, "out": {"maxcount": 3}}


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
def test_flow_on_dask_local_cluster_matches_local(tiny_shards, tmp_path, reference, prefect_home, monkeypatch):
    """2 Dask worker processes (LocalCluster n_workers=2, daemonic), each starting its own decode workers for the
    groups of shards it embeds: byte-identical to the plain stages; the counts come from the groups' results."""
    from bicro_clean.flows.clean_shards import PrefectTasks, run_flow

    plans = []  # every grouping the run asked for: the shards first, then the report's annotated files
    plan = PrefectTasks.shard_batches
    monkeypatch.setattr(PrefectTasks, "shard_batches", lambda self, items: plans.append(plan(self, items)) or
                        plans[-1])
    config = CleanConfig.model_validate({**_params(tiny_shards, tmp_path),
                                         "runner": {"kind": "dask", "workers": 2}})
    assert config.embed.num_workers >= 1
    summary = run_flow(config)
    assert [len(group) for group in plans[0]] == [1, 1, 1, 1]  # 4 groups per worker the cluster reported, at most
    assert _hashes(tmp_path) == reference
    assert summary["shards"] == 4 and summary["cached_shards"] == 0
    assert summary["lost_workers"] == [] and summary["retries"] == {}


@pytest.mark.slow
def test_flow_on_ray_matches_local(tiny_shards, tmp_path, reference, prefect_home):
    """prefect-ray's RayTaskRunner on a local Ray started for the run, default decode workers: the same bytes."""
    pytest.importorskip("prefect_ray", reason="the Ray runner's extra: pip install 'bicro-clean[ray]'")
    from bicro_clean.flows.clean_shards import run_flow

    config = CleanConfig.model_validate({**_params(tiny_shards, tmp_path), "runner": {"kind": "ray"}})
    summary = run_flow(config)
    assert _hashes(tmp_path) == reference
    assert summary["shards"] == 4 and summary["in"] == summary["kept"] + summary["dropped"] + summary["errors"]


def test_no_temporary_server_is_launched_when_an_api_url_is_configured(tmp_path):
    """flows/ephemeral.py launches Prefect's temporary API server only where Prefect itself would start one."""
    import subprocess

    script = ("from bicro_clean.flows import ephemeral\n"
              "ephemeral.start_early()\n"
              "with ephemeral.api_for_flow():\n"
              "    print(sorted(ephemeral._SERVER))\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_bad_config_is_rejected_before_any_work(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="input"):
        CleanConfig.model_validate({"output": str(tmp_path)})
    assert not any(tmp_path.iterdir())
    assert shutil.which("prefect", path=str(BIN)), "prefect CLI is installed with the package"


# ------------------------------------------------------------------ scale-out: batches, workers, task arguments


def test_shard_groups_are_contiguous_and_several_per_worker():
    """Task runs per stage follow the workers, not the shards; groups small enough to rebalance."""
    from bicro_clean.flows.clean_shards import PrefectTasks
    from bicro_clean.pipeline.shard_groups import GROUPS_PER_WORKER, split_even

    shards = [f"s{i}.tar" for i in range(300)]
    groups = PrefectTasks(2).shard_batches(shards)
    assert len(groups) == 2 * GROUPS_PER_WORKER and {len(g) for g in groups} <= {37, 38}
    assert len(PrefectTasks(2).shard_batches(shards * 100)) == 2 * GROUPS_PER_WORKER  # 30,000 shards: still 8
    assert [len(g) for g in PrefectTasks(3).shard_batches(shards[:7])] == [1] * 7
    assert split_even(shards[:7], 1) == [shards[:7]]
    assert [len(b) for b in split_even(shards[:7], 3)] == [3, 2, 2]
    for workers in range(1, 9):
        assert [s for group in PrefectTasks(workers).shard_batches(shards) for s in group] == shards  # order kept


def test_worker_count_follows_the_cluster():
    from bicro_clean.flows.runners import worker_count
    from bicro_clean.pipeline.config import RunnerConfig

    class Client:
        def __init__(self, n):
            self.n = n

        def nthreads(self):
            return {f"tcp://w{i}": 1 for i in range(self.n)}

    class DaskLike:
        def __init__(self, n):
            self.client = Client(n)

    assert worker_count(RunnerConfig(kind="dask", workers=2), DaskLike(8)) == 8  # e.g. one per GPU
    assert worker_count(RunnerConfig(kind="dask", workers=3), DaskLike(0)) == 3  # workers not up yet
    assert worker_count(RunnerConfig(kind="local", workers=4), object()) == 4
    assert worker_count(RunnerConfig(kind="dask", workers=2)) == 2  # outside a flow


def test_cuda_cluster_option_builds_a_local_cuda_cluster_runner(monkeypatch):
    """The wiring only: a stand-in dask_cuda module, no cluster started, no CUDA touched."""
    import types

    from prefect_dask import DaskTaskRunner

    from bicro_clean.flows.runners import task_runner_for
    from bicro_clean.pipeline.config import RunnerConfig

    fake = types.ModuleType("dask_cuda")

    class LocalCUDACluster:  # never instantiated here
        pass

    fake.LocalCUDACluster = LocalCUDACluster
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    runner = task_runner_for(RunnerConfig(kind="dask", cuda_cluster=True, workers=2))
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.resolved_cluster_class is LocalCUDACluster
    assert runner.cluster_kwargs == {"threads_per_worker": 1}  # n_workers: one per visible GPU, dask-cuda's default
    plain = task_runner_for(RunnerConfig(kind="dask", workers=2))
    assert plain.cluster_kwargs["n_workers"] == 2 and plain.resolved_cluster_class.__name__ == "LocalCluster"


def test_cuda_cluster_without_the_extra_or_outside_dask_is_a_clear_error(monkeypatch):
    from pydantic import ValidationError

    from bicro_clean.flows.runners import task_runner_for
    from bicro_clean.pipeline.config import RunnerConfig

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'bicro-clean\[gpu\]'"):
        task_runner_for(RunnerConfig(kind="dask", cuda_cluster=True))
    with pytest.raises(ValidationError, match="cuda_cluster"):
        RunnerConfig(kind="local", cuda_cluster=True)
    with pytest.raises(ValidationError, match="cuda_cluster"):
        RunnerConfig(kind="dask", cuda_cluster=True, dask_address="tcp://h:8786")


def _small(value) -> bool:
    """What may travel into a task: paths, configs, run-wide values, the report scan's bounded partials (fixed-size
    histograms and a few gallery rows per group) and small containers of them, never a model or a tensor."""
    from bicro_clean.pipeline.pack_plan import OutputPlan
    from bicro_clean.pipeline.report.scan import ScanPartial, ScanSetup
    from bicro_clean.pipeline.select import RunWide

    # OutputPlan: one output shard's byte ranges in the parts it is cut from (a few per shard, bounded by --maxcount)
    if isinstance(value, (str, int, float, bool, type(None), CleanConfig, RunWide, ScanSetup, ScanPartial, OutputPlan)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_small(v) for v in value)
    if isinstance(value, dict):
        return all(_small(v) for v in value.values())
    return False


def test_tasks_get_paths_and_configs_only_and_the_summary_times_each_stage(tiny_shards, tmp_path):
    from bicro_clean.pipeline.run import InProcess, run_stages

    seen = []

    class Recording(InProcess):
        def map(self, stage, items, *shared):
            seen.append((stage.__name__, [items, *shared]))
            return super().map(stage, items, *shared)

        def call(self, stage, *args):
            seen.append((stage.__name__, list(args)))
            return super().call(stage, *args)

    summary, _ = run_stages(CleanConfig.model_validate(_params(tiny_shards, tmp_path)), Recording())
    assert [name for name, _ in seen] == ["embed_group", "fit_stage", "score_group", "run_wide_values",
                                          "write_group", "plan_stage", "pack_group", "place_group",
                                          "finalize_stage", "report_scan", "report_stage"]
    for name, args in seen:
        assert _small(args), (name, [type(a) for a in args])
    stages = summary["stage_seconds"]
    assert list(stages) == ["embed", "fit", "score", "run_wide", "write", "pack", "finalize", "report"]
    assert all(isinstance(s, float) and s >= 0 for s in stages.values())
    assert summary["total_seconds"] >= sum(stages.values()) - 0.05
    assert summary["in"] == summary["kept"] + summary["dropped"] + summary["errors"]
