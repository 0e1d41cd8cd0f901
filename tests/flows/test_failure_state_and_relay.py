"""Two small pieces of the flow's plumbing, without a server: the one-line Failed state a stopped run ends in
(the real deployment runs are in test_prefect_cli.py), and the relay that carries a Dask worker's progress
reports to the flow's process (summed, a shard's `finish` in order after what came before it)."""

from __future__ import annotations

import logging

from bicro_clean.flows import failures, progress_relay
from bicro_clean.models.devices import DeviceUnavailableError
from bicro_clean.pipeline import progress
from bicro_clean.pipeline.checkpoint_use import CheckpointError
from bicro_clean.pipeline.outlock import OutputBusyError
from bicro_clean.pipeline.shards import MissingInputError


def test_each_error_gets_the_clis_line_and_a_failed_state_that_keeps_it():
    assert failures.one_line(MissingInputError("no shard matches\n'x/*.tar'")) == "input error: no shard matches 'x/*.tar'"
    assert failures.one_line(OutputBusyError("busy")) == "output error: busy"
    assert failures.one_line(CheckpointError("bad")) == "checkpoint error: bad"
    assert failures.one_line(DeviceUnavailableError("no cuda")) == "device error: no cuda"
    error = MissingInputError("no shard matches 'x'")
    state = failures.failed(error)  # outside a deployment's run: nothing to log or emit (the caller prints it)
    assert state.is_failed() and state.message == "input error: no shard matches 'x'" and state.data is error


def test_the_engines_traceback_of_our_errors_is_dropped_and_nothing_else():
    engine = logging.getLogger("prefect.flow_runs")
    assert failures._engine_reraise in engine.filters

    def record(message: str, error: BaseException) -> logging.LogRecord:
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, message, (),
                                 (type(error), error, None))

    assert not failures._engine_reraise(record(failures.ENGINE_RERAISE, MissingInputError("x")))
    assert failures._engine_reraise(record(failures.ENGINE_RERAISE, RuntimeError("a real crash")))
    assert failures._engine_reraise(record("Task run failed", MissingInputError("x")))


class _Worker:
    def __init__(self) -> None:
        self.events: list[tuple[str, list]] = []

    def log_event(self, topic: str, message: list) -> None:
        self.events.append((topic, message))


class _Sink:
    def __init__(self) -> None:
        self.reports: list[tuple] = []

    def report(self, stage, advance, total, items) -> None:
        self.reports.append((stage, advance, total, items))

    def stage_done(self, *args) -> None:
        pass


def test_a_workers_reports_are_summed_and_made_again_where_the_display_is(monkeypatch):
    worker = _Worker()
    relay = progress_relay._Relay(worker)
    monkeypatch.setattr(progress_relay, "FLUSH_S", 3600.0)  # nothing leaves on time alone here
    previous = progress.install_relay(relay)
    try:
        for _ in range(5):
            progress.report("embed", advance=8)
        progress.finish("embed", "a.tar", 40)
        progress.report("score", advance=1)
        relay.flush()
    finally:
        progress.install_relay(previous)
    assert [topic for topic, _ in worker.events] == [progress_relay.TOPIC] * 3
    messages = [message for _, message in worker.events]
    assert messages == [["report", ["embed", 40, 0, 0]], ["finish", ["embed", "a.tar", 40, False]],
                        ["report", ["score", 1, 0, 0]]]

    sink = _Sink()
    previous = progress.install(sink)
    try:
        for message in messages:
            progress_relay._replay((0.0, message))  # as the client's subscription hands them over
    finally:
        progress.install(previous)
    assert sink.reports == [("embed", 40, 0, 0), ("embed", 0, 0, 1), ("score", 1, 0, 0)]
