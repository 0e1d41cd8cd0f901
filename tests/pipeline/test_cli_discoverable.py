"""The CLI explains itself: --version, defaults in --help, `bicro-clean config` prints the effective config, and
examples/run.yaml is a loadable config."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import yaml
from conftest import config_fields
from typer.testing import CliRunner

from bicro_clean import cli
from bicro_clean.pipeline.config import CleanConfig, load_yaml

ROOT = Path(__file__).resolve().parents[2]


def _invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"})


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_version():
    result = _invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"bicro-clean {metadata.version('bicro-clean')}"


def test_help_shows_the_defaults_of_run_and_embed():
    run = " ".join(_invoke("run", "--help").stdout.split())
    for text in ("(default: towers)", "(default: 0.5)", "(default: clean_score)", "(default: local)",
                 "(default: 32768)", "(default: 8)", "(default: off)", "(default: 10000)", "FOLDER/*.tar"):
        assert text in run, text
    embed = " ".join(_invoke("embed", "--help").stdout.split())
    assert "(default: 64)" in embed and "(default: auto)" in embed and "on this machine)" in embed


def test_config_prints_every_field_as_run_would_use_it(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("input: shards\noutput: out\nselect: {threshold: 0.3}\nbicro: {epochs: 5}\n")
    result = _invoke("config", "--config", str(base), "--epochs", "3", "--runner", "none")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert set(_flat(printed)) == config_fields(CleanConfig)  # every field, excluded ones too (embed.jpeg_decode)
    assert printed["bicro"]["epochs"] == 3 and printed["select"]["threshold"] == 0.3
    assert printed["runner"]["kind"] == "none" and printed["input"] == "shards"
    # what it prints is a config: loading it gives the config run builds from the same file and flags
    again = tmp_path / "again.yaml"
    again.write_text(result.stdout)
    built = cli.build_config(base, cli._run_overrides(epochs=3, runner="none"))
    assert CleanConfig.model_validate(load_yaml(again)) == built


def test_config_without_input_names_what_is_missing():
    result = _invoke("config")
    assert result.exit_code == 0
    printed = yaml.safe_load(result.stdout)
    assert printed["input"] is None and printed["output"] is None and printed["embed"]["batch_size"] == 64
    assert re.search(r"^# input and output: required", result.stdout, re.M)


def test_config_rejects_a_bad_value_in_one_line():
    result = _invoke("config", "--threshold", "x")
    assert result.exit_code == 2
    result = _invoke("config", "--column", "nope")
    assert result.exit_code == 2 and result.stderr.startswith("config error: select.column")
    assert len(result.stderr.splitlines()) == 1


def test_the_example_config_loads_and_validates():
    path = ROOT / "examples" / "run.yaml"
    config = CleanConfig.model_validate(load_yaml(path))
    assert config.input == "shards" and config.output == "cleaned"
    assert "#" in path.read_text()  # commented
