"""The per-shard stages as groups of shards: decode workers start inside daemonic worker processes, the console's
stage lines and the summary's counts come from the groups' results, and lost workers and retried groups are
reported with the shards they concern."""

from __future__ import annotations

import multiprocessing
import queue

import pytest

from conftest import tiny_config
from bicro_clean.pipeline import progress
from bicro_clean.pipeline.progress import Tally
from bicro_clean.pipeline.shard_groups import GroupResult, execution, tally
from bicro_clean.pipeline.shards import shard_id


def _embed_in_daemon(config, answers) -> None:
    from bicro_clean.pipeline.embed import embed_shards

    try:
        answers.put(("ok", [r.samples for r in embed_shards(config)]))
    except BaseException as error:  # the parent reports it
        answers.put(("error", f"{type(error).__name__}: {error}"))


def test_decode_workers_start_inside_a_daemonic_process(tiny_shards, tmp_path):
    """What a Dask worker is (LocalCluster's and a nanny's): a daemonic multiprocessing child. Its embed stage
    starts DataLoader decode workers, which multiprocessing refuses to a daemonic process unless the stage
    allows it (pipeline/daemon_children.py)."""
    config = tiny_config(str(tiny_shards / "*.tar"), tmp_path / "out", embed={"num_workers": 2})
    context = multiprocessing.get_context("spawn")  # a fork of a process that ran torch threads may hang in torch
    answers = context.Queue()
    worker = context.Process(target=_embed_in_daemon, args=(config, answers), daemon=True)
    worker.start()
    try:
        status, value = answers.get(timeout=300)
    except queue.Empty:
        pytest.fail("the daemonic process gave no answer")
    finally:
        worker.join(timeout=60)
    assert status == "ok", value
    assert sum(value) == 19 and multiprocessing.current_process().daemon is False


def test_stage_lines_say_what_the_groups_did():
    assert progress.describe("embed", Tally(shards=8, pairs=160, tasks=8)) == "8 shards, 160 pairs"
    assert progress.describe("embed", Tally(shards=8, cached=8, tasks=8)) == "all shards cached"
    assert progress.describe("embed", Tally(shards=8, cached=3, pairs=50, tasks=2, retried=1)) == \
        "5 shards, 50 pairs, 3 cached, 1 retried"
    assert progress.describe("score", Tally(shards=8, cached=1, tasks=4)) == "8 shards, 1 cached"
    assert progress.describe("write", Tally(shards=8, tasks=8)) == "8 shards"


def test_lost_workers_and_retries_are_named_with_their_shards():
    lost = {"worker": "tcp://127.0.0.1:4000", "name": "wA", "host": "127.0.0.1"}
    results = [
        GroupResult("score", ["d/00000.tar", "d/00001.tar"], ["s0", "s1"], [True, False], lost_workers=[lost]),
        GroupResult("score", ["d/00002.tar"], ["s2"], [False]),
        GroupResult("write", ["d/00003.tar"], [{}], [False], attempt=2),
    ]
    assert execution(results[1:2]) == {}  # nothing went wrong: nothing recorded (the manifest stays as it was)
    found = execution(results)
    sid = [shard_id(f"d/0000{i}.tar") for i in range(4)]
    assert found["lost_workers"] == [{**lost, "stage": "score", "shards": sid[:2], "redone": sid[1:2]}]
    assert found["retries"] == {"score": {"tasks": 1, "shards": sid[:2]}, "write": {"tasks": 1, "shards": sid[3:]}}
    assert tally(results[:2]) == Tally(shards=3, cached=1, pairs=0, tasks=2, retried=1)


def test_dask_remove_worker_events_are_matched_to_the_groups():
    """The scheduler's remove-worker events name the keys the worker was running (or held results of); the flow
    matches them to its own futures and records the worker in that group's result."""
    from bicro_clean.flows.clean_shards import PrefectTasks

    class Future:
        def __init__(self, key):
            self.wrapped_future = type("DaskFuture", (), {"key": key})()

    class Client:
        def get_events(self, topic):
            assert topic == "all"
            return [(1.0, {"action": "add-worker", "worker": "tcp://a"}),
                    (2.0, {"action": "remove-worker", "worker": "tcp://a", "processing-tasks": {"score-k2"},
                           "lost-computed-tasks": set(), "expected": False}),
                    (3.0, {"action": "remove-worker", "worker": "tcp://b", "processing-tasks": {"embed-old"},
                           "lost-computed-tasks": {"score-k1"}, "expected": False})]

    tasks = PrefectTasks(2)
    tasks.client, tasks.known = Client(), {"tcp://a": {"worker": "tcp://a", "name": "wA"}}
    results = [GroupResult("score", [f"d/0000{i}.tar"], [f"s{i}"], [False]) for i in range(3)]
    tasks._note_lost_workers([Future(f"score-k{i}") for i in range(3)], results)
    assert results[0].lost_workers == []
    assert results[1].lost_workers == [{"worker": "tcp://b", "name": "tcp://b"}]  # unknown: named by address
    assert results[2].lost_workers == [{"worker": "tcp://a", "name": "wA"}]


class _Lines:
    """A progress sink that keeps each stage's tally."""

    def __init__(self) -> None:
        self.tallies: dict[str, Tally | None] = {}

    def report(self, stage, advance, total, items) -> None:
        pass

    def stage_done(self, stage, seconds, tally=None) -> None:
        self.tallies[stage] = tally


def test_the_stage_lines_count_results_not_progress_reports(tiny_shards, tmp_path, monkeypatch):
    """The closing lines come from the groups' results, so they hold when the work ran in another process (whose
    progress reports never reach this one: here no stage reports progress at all)."""
    from bicro_clean.pipeline.run import run_pipeline

    monkeypatch.setattr(progress, "report", lambda *args, **kwargs: None)
    lines = _Lines()
    previous = progress.install(lines)
    try:
        config = tiny_config(str(tiny_shards / "*.tar"), tmp_path / "out")
        summary = run_pipeline(config, report=False)
        first = dict(lines.tallies)
        run_pipeline(config, report=False)
    finally:
        progress.install(previous)
    assert first["embed"] == Tally(shards=4, cached=0, pairs=19, tasks=1)
    assert first["score"] == Tally(shards=4, tasks=1) and first["write"] == Tally(shards=4, pairs=19, tasks=1)
    assert first["fit"] is None  # not a per-shard stage: its line is the fit's own
    assert lines.tallies["embed"] == Tally(shards=4, cached=4, tasks=1)
    assert lines.tallies["score"].cached == lines.tallies["write"].cached == 4
    assert summary["lost_workers"] == [] and summary["retries"] == {}
