"""What the `bicro-clean` commands share: the options of run/embed/config (with the config's defaults in their help),
the checks of --input, --out and --config that fail in one line before any model loads, the version, and the
effective config as YAML.

Every failure here is one line on stderr and exit code 2, never a traceback: a user's typo is not a crash.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from bicro_clean.pipeline.config import CleanConfig, load_yaml, merge_overrides

REQUIRED = ("input", "output")


# ------------------------------------------------------------------------------------------------ config + errors


def fail(kind: str, message: str) -> typer.Exit:
    """Print `kind error: message` as one line on stderr; raise the returned Exit (code 2)."""
    typer.echo(f"{kind} error: {' '.join(str(message).split())}", err=True)
    return typer.Exit(2)


def format_validation_error(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"config error: {field}: {first['msg']}{more}"


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


def output_problem(output: str) -> str | None:
    """Why a local output folder cannot be used (an existing file, not writable), or None. URLs are left to the
    run: checking them costs requests and credentials."""
    import fsspec

    protocol, path = fsspec.core.split_protocol(output)
    if protocol not in (None, "file", "local"):
        return None
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--out {output!r} is an existing file, not a folder"
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--out {output!r} cannot be created: {parent!r} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {output!r} is not writable" if parent == path else \
            f"--out {output!r} cannot be created: {parent!r} is not writable"
    return None


def check_io(config: CleanConfig) -> list[str]:
    """The shards the spec names and a usable output folder, checked before any model loads: each problem is one
    line on stderr and exit code 2. Returns the shard URLs."""
    from bicro_clean.pipeline.shards import InputError, expand_shard_spec

    try:
        shards = list(expand_shard_spec(config.input, allow_pipe=config.reader.allow_pipe))
    except InputError as error:
        raise fail("input", error)
    problem = output_problem(config.output)
    if problem:
        raise fail("output", problem)
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
ENCODER_OPT = opt("embed.encoder", "--encoder", help="towers | open_clip:MODEL:TAG_OR_PATH | tiny.")
WORKERS_OPT = opt("embed.num_workers", "--workers", help="Decode worker processes.")
DEVICE_OPT = opt("embed.device", "--device", help="auto | cpu | cuda.")


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
    return header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
