"""What the `bicro-clean` commands share: the options of run/embed/config (with the config's defaults in their help),
the checks of --input, --out and --config that fail in one line before any model loads, the version, and the
effective config as YAML.

Every failure here is one line on stderr and exit code 2, never a traceback: a user's typo is not a crash.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import typer
import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from bicro_clean.pipeline.config import CleanConfig, dump_yaml, load_yaml, merge_overrides

REQUIRED = ("input", "output")


# ------------------------------------------------------------------------------------------------ config + errors


def fail(kind: str, message: str) -> typer.Exit:
    """Print `kind error: message` as one line on stderr; raise the returned Exit (code 2)."""
    typer.echo(f"{kind} error: {' '.join(str(message).split())}", err=True)
    return typer.Exit(2)


def format_validation_error(error: ValidationError) -> str:
    """One line naming the first bad field (`config error: bicro.fit_sample: 1 is too small: ...`)."""
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")  # pydantic's wrapper of our validators' ValueErrors
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return " ".join(f"config error: {field + ': ' if field else ''}{message}{more}".split())


def _yaml_problem(path: Optional[Path], error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    return f"{path}: malformed YAML{where}: {problem}"


def merged_config(config_file: Optional[Path], overrides: dict[str, Any]) -> dict[str, Any]:
    """The YAML file with the flags on top, as a dict; a missing, unreadable or malformed file exits 2."""
    try:
        return merge_overrides(load_yaml(config_file), overrides)
    except yaml.YAMLError as error:
        raise fail("config", _yaml_problem(config_file, error))
    except (OSError, ValueError) as error:
        raise fail("config", error)


def validate(data: dict[str, Any]) -> CleanConfig:
    try:
        return CleanConfig.model_validate(data)
    except ValidationError as error:
        typer.echo(format_validation_error(error), err=True)
        raise typer.Exit(2)
    except ValueError as error:
        raise fail("config", error)


def build_config(config_file: Optional[Path], overrides: dict[str, Any]) -> CleanConfig:
    """YAML first, flags on top; a bad value exits with code 2 and a one-line message naming the field."""
    return validate(merged_config(config_file, overrides))


def check_io(config: CleanConfig, owner: bool = False) -> list[str]:
    """The shards the spec names (none inside --out: a run never reads its own outputs) and a usable output folder,
    checked before any model loads: each problem is one line on stderr and exit code 2. `owner`: also refuse an
    output folder another configuration wrote (unless out.overwrite). Returns the shard URLs."""
    from bicro_clean.pipeline.checkpoint_use import up_front_problem
    from bicro_clean.pipeline.outlock import output_problem
    from bicro_clean.pipeline.owner import outside_output, owner_problem
    from bicro_clean.pipeline.shards import InputError, expand_shard_spec

    try:
        shards = outside_output(config, list(expand_shard_spec(config.input, allow_pipe=config.reader.allow_pipe)),
                                note=False)  # the run notes the skipped ones
    except InputError as error:
        raise fail("input", error)
    problem = output_problem(config.output) or (owner_problem(config) if owner else None)
    if problem:
        raise fail("output", problem)
    if found := up_front_problem(config):  # --device cuda without CUDA here, an unusable --checkpoint
        raise fail(*found)
    return shards


# ------------------------------------------------------------------------------------------------ help + version


def _field(dotted: str) -> Any:
    model: type[BaseModel] = CleanConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[leaf]


def config_default(dotted: str) -> str:
    """The default of a CleanConfig field as help text shows it ("64", "none", "off", "2 here": a factory's)."""
    field = _field(dotted)
    if field.default_factory is not None:
        return f"{field.default_factory()} on this machine"
    value = field.default
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def opt(dotted: str, *names: str, help: str) -> Any:
    """A flag that overrides config field `dotted`: None (not given) by default, the config's default in --help."""
    return typer.Option(None, *names, help=f"{help} (default: {config_default(dotted)})", show_default=False)


INPUT_HELP = ("Shard spec (repeatable): a path, a glob ('shards/*.tar'), a brace range ('shards/{00000..00099}.tar'), "
              "an fsspec URL, or a folder, which means FOLDER/*.tar (img2dataset's output). Required here or in "
              "--config.")
CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML file with any CleanConfig fields (see examples/run.yaml; "
                          "`bicro-clean config` prints every field); flags override it.")
INPUT_OPT = typer.Option(None, "--input", "-i", help=INPUT_HELP, show_default=False)
OUT_OPT = typer.Option(None, "--out", "-o", help="Output folder (local or fsspec URL); created if missing. Required "
                       "here or in --config.", show_default=False)
ENCODER_OPT = opt("embed.encoder", "--encoder",
                  help="towers | towers:IMAGE:TEXT | open_clip:MODEL:TAG_OR_PATH | tiny (docs/config.md).")
WORKERS_OPT = opt("embed.num_workers", "--workers", help="Decode worker processes.")
DEVICE_OPT = opt("embed.device", "--device", help="auto | cpu | cuda | cuda:N | mps.")
OVERWRITE_OPT = typer.Option(None, "--overwrite", show_default=False, help="Take over an --out written with another "
                             "configuration (refused without it); caches still valid are reused.")


def version_callback(value: bool) -> None:
    if value:
        try:
            version = metadata.version("bicro-clean")
        except metadata.PackageNotFoundError:  # run from a source tree without an install
            version = "unknown"
        typer.echo(f"bicro-clean {version}")
        raise typer.Exit()


# ------------------------------------------------------------------------------------------------ effective YAML


def _values(model: BaseModel) -> dict[str, Any]:
    """Every field in declaration order, excluded ones (kept out of the hashes) too: what the run uses."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        out[name] = _values(value) if isinstance(value, BaseModel) else to_jsonable_python(value)
    return out


def effective_yaml(config_file: Optional[Path], overrides: dict[str, Any]) -> str:
    """The config a run with these flags would use, as YAML: every field with its value. input/output, when given
    neither in the file nor as flags, print as null under a comment (a run needs them)."""
    data = merged_config(config_file, overrides)
    missing = [name for name in REQUIRED if data.get(name) is None]
    values = _values(validate({**data, **{name: "-" for name in missing}}))
    header = "# bicro-clean effective config (a file for --config; flags given here are applied)\n"
    if missing:
        values.update({name: None for name in missing})
        header += f"# {' and '.join(missing)}: required, set here or give --input / --out\n"
    return header + dump_yaml(values)


# ------------------------------------------------------------------------------------------------ the terminal

# Loggers that talk at INFO about their own plumbing (Prefect's API client, the faiss loader, model libraries).
CHATTY_LOGGERS = ("httpx", "httpcore", "prefect", "faiss", "faiss.loader", "sentence_transformers", "transformers",
                  "torch", "urllib3", "filelock", "huggingface_hub")
QUIET_WARNINGS = r"(sentence_transformers|transformers|torchvision|huggingface_hub|open_clip|timm)(\.|$)"
STAGE_NAMES = {"run_wide": "select"}


def _not_open_clip_chatter(record: logging.LogRecord) -> bool:
    """open_clip logs to the root logger (model config, 'no pretrained weights' for the tiny test encoder)."""
    return not (record.name == "root" and record.levelno < logging.ERROR and "open_clip" in record.pathname)


RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")  # where Prefect logs a failed task or flow, with traceback


def _not_changed_input(record: logging.LogRecord) -> bool:
    """An input shard that changed since it was embedded stops the run with the CLI's one line, not with Prefect's
    tracebacks of the task and the flow it failed (pipeline/content_id.py)."""
    error = record.exc_info[1] if record.exc_info else None
    return type(error).__name__ != "InputChangedError" and "InputChangedError" not in str(record.msg)


def configure_logging(mode: str) -> Callable[[], None]:
    """`verbose`: every logger at INFO, bicro_clean at DEBUG (the full log); `default`: warnings of anyone, minus
    the listed libraries' INFO and known deprecation warnings; `quiet`: errors only. Prefect reads its level from
    the environment when it is imported. Returns what undoes it (a command run in-process, as in tests)."""
    names = ("", "bicro_clean", *CHATTY_LOGGERS)
    levels = {name: logging.getLogger(name).level for name in names}
    saved_filters, saved_handlers = warnings.filters[:], logging.getLogger().handlers[:]
    set_env = mode != "verbose" and "PREFECT_LOGGING_LEVEL" not in os.environ

    def restore() -> None:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        root = logging.getLogger()
        for handler in root.handlers[:]:
            handler.removeFilter(_not_open_clip_chatter)
        for name in RUN_LOGGERS:
            logging.getLogger(name).removeFilter(_not_changed_input)
            if handler not in saved_handlers:
                root.removeHandler(handler)
        warnings.filters[:] = saved_filters
        getattr(warnings, "_filters_mutated", lambda: None)()  # what warnings.catch_warnings does on exit
        if set_env:
            os.environ.pop("PREFECT_LOGGING_LEVEL", None)

    if set_env:
        os.environ["PREFECT_LOGGING_LEVEL"] = "ERROR" if mode == "quiet" else "WARNING"
        warnings.filterwarnings("ignore", category=FutureWarning, module=QUIET_WARNINGS)
        warnings.filterwarnings("ignore", category=UserWarning, module=QUIET_WARNINGS)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=QUIET_WARNINGS)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if mode == "verbose" else "%(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
    for handler in root.handlers:
        if mode != "verbose" and _not_open_clip_chatter not in handler.filters:
            handler.addFilter(_not_open_clip_chatter)
    for name in RUN_LOGGERS if mode != "verbose" else ():
        logging.getLogger(name).addFilter(_not_changed_input)
    floor = {"verbose": logging.INFO, "default": logging.WARNING, "quiet": logging.ERROR}[mode]
    root.setLevel(floor)
    logging.getLogger("bicro_clean").setLevel(logging.DEBUG if mode == "verbose" else floor)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if mode == "verbose" else max(floor, logging.WARNING))
    return restore


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f}s"


def _stage_detail(stage: str, done: int, total: int, items: int) -> str:
    if stage == "embed":  # counted in pairs; `items`: the shards done
        return f"{items} shards, {done:,} pairs" if done else "all shards cached"
    if stage == "fit":
        return f"{items:,} pairs, {done} epochs" if total else "reused checkpoint"
    if stage in ("score", "write") and done:
        return f"{done} shards"
    return ""


class Terminal:
    """The CLI's progress sink (pipeline/progress.py): one rich bar per running stage on a terminal (pairs for
    embed, epochs for fit, shards for score and write, files for report), each with its rate and the time left
    (bicro_clean/progress_columns.py), and one line per finished stage; thread-safe (stages report from Prefect's
    task threads). On a non-terminal stderr no bars are drawn, only the lines. `console`: where to draw (stderr)."""

    def __init__(self, mode: str, console: Any = None) -> None:
        from rich.console import Console

        self.mode = mode
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.bars = mode != "quiet" and self.console.is_terminal
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def report(self, stage: str, advance: int, total: int, items: int) -> None:
        with self._lock:
            counts = self._counts.setdefault(stage, [0, 0, 0])
            counts[0] += advance
            counts[1] += total
            counts[2] += items
            if self.bars:
                self._draw(stage, counts)

    def _draw(self, stage: str, counts: list[int]) -> None:
        from rich import progress as bars

        from bicro_clean.progress_columns import columns, unit_detail

        if self._progress is None:
            self._progress = bars.Progress(*columns(), console=self.console, transient=True)
            self._progress.start()
        unit = unit_detail(stage, counts[2])
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=counts[1] or None, unit=unit)
        self._progress.update(self._tasks[stage], completed=counts[0], total=counts[1] or None, unit=unit)

    def stage_done(self, stage: str, seconds: float, tally: Any = None) -> None:
        """`tally` (pipeline.progress.Tally): the stage's counts from its task results, which hold under every
        runner; the bars' own counters only see work done in this process."""
        from bicro_clean.pipeline.progress import describe

        with self._lock:
            done, total, items = self._counts.pop(stage, [0, 0, 0])
            if stage in self._tasks:
                self._progress.remove_task(self._tasks.pop(stage))
                if self._tasks:
                    self._progress.refresh()
                else:  # the last bar: take the display down (transient), the next stage starts a new one
                    self._progress.stop()
                    self._progress = None
            if self.mode != "quiet":
                detail = describe(stage, tally) if tally is not None else _stage_detail(stage, done, total, items)
                self.console.print(f"{STAGE_NAMES.get(stage, stage):<9}{detail:<28} {_duration(seconds):>7}")

    def snapshot(self) -> str:
        """The bars as they would be drawn now, as plain text ("" when none are)."""
        from bicro_clean.progress_columns import snapshot

        with self._lock:
            return snapshot(self._progress)

    def close(self) -> None:
        with self._lock:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
            self._tasks.clear()


TERMINAL: dict[str, Any] = {"mode": "default"}


def start_terminal(mode: str) -> Terminal:
    """Logging for `mode` and the progress display, installed process-wide until `stop_terminal`."""
    from bicro_clean.pipeline import progress

    restore = configure_logging(mode)
    terminal = Terminal(mode)
    TERMINAL.update(mode=mode, terminal=terminal, restore=restore)
    progress.install(terminal)
    return terminal


def stop_terminal() -> None:
    from bicro_clean.pipeline import progress

    restore = TERMINAL.pop("restore", None)
    if restore is not None:
        restore()
    terminal = TERMINAL.pop("terminal", None)
    if terminal is not None:
        terminal.close()
        previous = progress.install(None)
        if previous is not terminal:  # someone else's sink: leave it
            progress.install(previous)
