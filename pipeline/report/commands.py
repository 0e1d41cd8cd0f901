"""The commands a slider position stands for: rerun this run with `--threshold T` or `--keep-fraction F`.

A rerun with only another rule reuses every score (the owner record then needs `--overwrite`, see owner.py), but
only when everything else is as this run had it: so the command repeats the run's input, output and each setting
that differs from the default and has a `bicro-clean run` flag. Settings that differ without a flag came from a
config file: the command then names one (`--config CONFIG.yaml`) and the page lists those settings. The select
settings are left out (the slider gives its own), as are the runner and speed-only settings, which change no
output (resume.config_hash leaves them out too).

`bicro-clean select --from OUT --keep-fraction F` re-decides a finished run from its own manifest with nothing
else to repeat; `--threshold` there only replaces a threshold rule (a run made with a keep fraction keeps it).

The page writes the output folder as OUT, never its path: the report's bytes depend only on the run's data and
settings, so two runs of the same crawl into two folders (or buckets) write the same page.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from bicro_clean.pipeline.config import CleanConfig, dotted_fields
from bicro_clean.pipeline.resume import RUNTIME_ONLY

# config field -> `bicro-clean run` flag (bicro_clean/cli.py); booleans have a --x/--no-x pair
FLAGS = {"embed.encoder": "--encoder", "bicro.fit_sample": "--fit-sample", "bicro.epochs": "--epochs",
         "out.maxcount": "--maxcount", "out.maxsize": "--maxsize", "out.keep_embeddings": "--keep-embeddings",
         "reader.allow_pipe": "--allow-pipe"}
SKIPPED = ("select.", "runner.", "out.overwrite", "input", "output", "checkpoint")
CONFIG_FILE = "CONFIG.yaml"
OUTPUT = "OUT"  # the page's name for the run's output folder (the one holding report.html)


@dataclass(frozen=True)
class Commands:
    """The parts of a position's commands that do not depend on the position."""

    run: str  # `bicro-clean run ...` up to the selection flags
    select: str  # `bicro-clean select --from OUT`
    by_fraction: bool  # this run used a keep fraction (select --threshold would not replace it)
    from_file: tuple[str, ...]  # settings that differ from the default without a flag

    def as_data(self) -> dict[str, Any]:
        return {"run": self.run, "select": self.select, "by_fraction": self.by_fraction,
                "from_file": list(self.from_file)}


def _skipped(name: str) -> bool:
    return name.startswith(SKIPPED) or (name.startswith("embed.") and name.split(".", 1)[1] in RUNTIME_ONLY)


def changed_settings(config: CleanConfig) -> dict[str, Any]:
    """The output-shaping settings this run has that differ from the defaults (dotted name -> value)."""
    default = CleanConfig.model_validate({"input": config.input, "output": config.output})
    ours, base = dotted_fields(config.model_dump(mode="json")), dotted_fields(default.model_dump(mode="json"))
    return {name: value for name, value in ours.items() if not _skipped(name) and value != base.get(name)}


def _flag(name: str, value: Any) -> str:
    flag = FLAGS[name]
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {shlex.quote(str(value))}"


def run_commands(config: CleanConfig, by_fraction: bool, output: str = OUTPUT) -> Commands:
    """The commands with `output` as the output folder: OUTPUT on the page (see the module docstring)."""
    inputs = [config.input] if isinstance(config.input, str) else list(config.input)
    parts = ["bicro-clean run", *(f"--input {shlex.quote(i)}" for i in inputs), f"--out {shlex.quote(output)}"]
    changed = changed_settings(config)
    from_file = tuple(sorted(n for n in changed if n not in FLAGS))
    if from_file:
        parts.append(f"--config {CONFIG_FILE}")
    parts += [_flag(name, value) for name, value in sorted(changed.items()) if name in FLAGS]
    if config.checkpoint:
        parts.append(f"--checkpoint {shlex.quote(config.checkpoint)}")
    return Commands(" ".join(parts), f"bicro-clean select --from {shlex.quote(output)}", by_fraction,
                    from_file)
