"""How a flow run that one of our one-line errors stopped ends: Failed, with that line as its state message.

`bicro-clean run` turns a bad input, an unusable output or checkpoint, or a missing GPU into one line
(`input error: no shard matches '/data/*.tar'`) and exit code 2. A deployment run has no such CLI around it:
left alone, Prefect logs the traceback and sets the message `Flow run encountered an exception: ...`, and
`prefect deployment run --watch` prints only `Failed`. So the flow returns a Failed state whose message is the
CLI's line (`prefect flow-run inspect ID` and the UI show it), logs that line, and emits it as an event related to
the flow run: `--watch` streams a run's events (its logs only where the server streams logs out, which is off
by default), so the line appears there, just before `Failed`. The state keeps the error itself as its data, so a
caller of the flow in-process (`bicro-clean run`) still gets that exception and prints its own line. A worker's
flow-run process raises that error again at its very end (Prefect's engine re-raises a failed run's result) and
logs it with a traceback: `_engine_reraise` drops that one record, whose line the run has logged already.
"""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.logging import get_run_logger
from prefect.states import Failed, State

from bicro_clean.models.devices import DeviceUnavailableError
from bicro_clean.pipeline.checkpoint_use import CheckpointError
from bicro_clean.pipeline.outlock import OutputBusyError, OutputError
from bicro_clean.pipeline.shards import InputError

logger = logging.getLogger(__name__)

# The word each line starts with, as the CLI prints it (bicro_clean/cli.py, cli_support.check_io).
KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (InputError, "input"), (CheckpointError, "checkpoint"), (OutputBusyError, "output"), (OutputError, "output"),
    (DeviceUnavailableError, "device"))
ONE_LINE_ERRORS = tuple(kind for kind, _ in KINDS)
EVENT = "bicro-clean.run.failed"
ENGINE_RERAISE = "Engine execution exited with unexpected exception"  # prefect/flow_engine.py's top-level log


def _engine_reraise(record: logging.LogRecord) -> bool:
    """False (drop) for the engine's traceback of a run `failed` ended: the state message holds its line."""
    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, ONE_LINE_ERRORS) and record.getMessage() == ENGINE_RERAISE)


def quiet_engine_reraise() -> None:
    """Install the filter on the logger of Prefect's flow-run engine (once; on import of this module, which the
    flow's module imports in every process that runs the flow)."""
    engine = logging.getLogger("prefect.flow_runs")
    if _engine_reraise not in engine.filters:
        engine.addFilter(_engine_reraise)


def one_line(error: BaseException) -> str:
    """`input error: ...`: the line `bicro-clean run` prints for `error` (whitespace folded to one line)."""
    word = next((word for kind, word in KINDS if isinstance(error, kind)), "run")
    return f"{word} error: {' '.join(str(error).split())}"


def _announce(line: str) -> None:
    """For a deployment's run: the line in the run's log and as an event of the flow run (what `--watch` shows),
    sent before the state changes so the watch prints it before the Failed that ends it. A run without a
    deployment was called in-process (`bicro-clean run`), whose caller prints the line itself, once."""
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is None or run.deployment_id is None:
        return
    run_id = run.id
    get_run_logger().error(line)
    try:
        emit_event(EVENT, resource={"prefect.resource.id": f"bicro-clean.run.{run_id}",
                                    "prefect.resource.name": line},
                   related=[{"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "flow-run"}],
                   payload={"message": line})
        EventsWorker.instance().wait_until_empty()
    except Exception as error:  # the event is a courtesy to the watcher; the state message carries the line anyway
        logger.debug("could not emit %s: %s", EVENT, error)


def failed(error: BaseException) -> State:
    """The flow's final state for one of ONE_LINE_ERRORS: Failed, its message the one line, its data the error."""
    line = one_line(error)
    _announce(line)
    return Failed(message=line, data=error)


quiet_engine_reraise()
