"""Bad input (no match, a typo'd range, a missing, unreadable or empty folder, an unusable --out, malformed YAML)
is one line on stderr and exit code 2, under both runners, before any model loads; a flow run fails with the same
line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bicro_clean import cli
from bicro_clean.pipeline import shards as shards_module
from bicro_clean.pipeline.shards import InputError, MissingInputError, UnsafeInputError, expand_shard_spec

SCRIPT = Path(sys.executable).with_name("bicro-clean")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """shards/00000.tar, 00001.tar (+ a stats file img2dataset writes next to them), an empty folder, a file."""
    (tmp_path / "shards").mkdir()
    for name in ("00000.tar", "00001.tar", "00000_stats.json"):
        (tmp_path / "shards" / name).write_bytes(b"x")
    (tmp_path / "shards" / "nested.tar").mkdir()  # a folder named like a shard is not a shard
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    return tmp_path


def _one_line(spec: str | list[str], error: type = InputError) -> str:
    with pytest.raises(error) as caught:
        list(expand_shard_spec(spec))
    message = str(caught.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------------------------------------------ the spec


def test_a_folder_means_its_tar_files(tree):
    assert list(expand_shard_spec(str(tree / "shards"))) == [str(tree / "shards" / f"0000{i}.tar") for i in (0, 1)]


def test_each_bad_spec_is_one_line_naming_the_problem(tree):
    assert "no shard matches" in _one_line(str(tree / "nope" / "*.tar"), MissingInputError)
    message = _one_line(str(tree / "shards" / "{00000..00003}.tar"), MissingInputError)
    assert "2 of the 4 shards" in message and "00002.tar" in message
    assert "unbalanced braces" in _one_line(str(tree / "shards" / "{00000.."))
    assert "braces were not expanded" in _one_line(str(tree / "shards" / "{00000..}.tar"))
    assert "has no *.tar shards" in _one_line(str(tree / "empty"), MissingInputError)
    assert "does not exist" in _one_line(str(tree / "missing.tar"), FileNotFoundError)  # still a FileNotFoundError
    assert "empty shard spec" in _one_line([])
    assert issubclass(UnsafeInputError, InputError) and issubclass(InputError, ValueError)


def test_an_unreadable_shard_is_an_input_error(tree, monkeypatch):
    monkeypatch.setattr(shards_module, "_readable", lambda path: not path.endswith("00001.tar"))
    assert "00001.tar' is not readable" in _one_line(str(tree / "shards"))
    assert "is not readable" in _one_line(str(tree / "shards" / "*.tar"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads every file")
def test_a_file_without_read_permission_is_an_input_error(tree):
    path = tree / "shards" / "00000.tar"
    path.chmod(0)
    try:
        assert "is not readable" in _one_line(str(path))
    finally:
        path.chmod(0o644)


def test_remote_literals_are_left_to_the_run():
    assert list(expand_shard_spec(["s3://bucket/a/{0..1}.tar"])) == ["s3://bucket/a/0.tar", "s3://bucket/a/1.tar"]
    assert "cannot list" in _one_line("nosuchprotocol://bucket/*.tar")


# ------------------------------------------------------------------------------------------------ the CLI


def _no_model(*_args, **_kwargs):
    raise AssertionError("a model loaded or a run started before the input was checked")


@pytest.fixture
def guarded(monkeypatch):
    monkeypatch.setattr(cli, "run_with_runner", _no_model)
    import bicro_clean.pipeline.embed as embed

    monkeypatch.setattr(embed, "embed_shards", _no_model)


def _bad_cases(tree: Path) -> list[tuple[list[str], str]]:
    shards, out = str(tree / "shards"), str(tree / "out")
    bad_yaml = tree / "bad.yaml"
    bad_yaml.write_text("input: [a\nembed: {batch_size: 4")
    return [
        (["--input", str(tree / "nope" / "*.tar"), "--out", out], "input error: no shard matches"),
        (["--input", str(tree / "shards" / "{00000..00009}.tar"), "--out", out], "8 of the 10 shards"),
        (["--input", str(tree / "shards" / "{00000.."), "--out", out], "unbalanced braces"),
        (["--input", str(tree / "empty"), "--out", out], "has no *.tar shards"),
        (["--input", shards, "--out", str(tree / "afile")], "output error: --out"),
        (["--input", shards, "--out", str(tree / "afile" / "sub")], "is a file"),
        (["--config", str(bad_yaml)], "config error: " + str(bad_yaml) + ": malformed YAML at line"),
    ]


@pytest.mark.parametrize("runner", ["none", "local"])
def test_run_fails_in_one_line_before_any_model_loads(tree, guarded, runner):
    for args, expected in _bad_cases(tree):
        result = CliRunner().invoke(cli.app, ["run", "--runner", runner, *args])
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
        assert expected in result.stderr, (args, result.stderr)
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_embed_fails_in_one_line_before_the_encoder_loads(tree, guarded):
    for args, expected in _bad_cases(tree):
        result = CliRunner().invoke(cli.app, ["embed", *args])
        assert result.exit_code == 2 and expected in result.stderr and len(result.stderr.splitlines()) == 1


def test_an_unwritable_out_is_one_line(tree, guarded, monkeypatch):
    access = os.access
    monkeypatch.setattr("bicro_clean.cli_support.os.access", lambda path, mode: access(path, mode) and not mode & os.W_OK)
    result = CliRunner().invoke(cli.app, ["run", "--input", str(tree / "shards"), "--out", str(tree / "new")])
    assert result.exit_code == 2 and "is not writable" in result.stderr


@pytest.mark.parametrize("runner", ["none", "local"])
def test_the_console_script_prints_only_the_line(tree, runner):
    """The real process: no traceback, no Prefect start-up, one line on stderr, exit 2."""
    done = subprocess.run([str(SCRIPT), "run", "--runner", runner, "--input", "nope/*.tar", "--out", "out"],
                          capture_output=True, text=True, timeout=120, cwd=tree)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"input error: no shard matches 'nope/*.tar' (working directory {tree})"]


def test_a_remote_out_that_refuses_writes_is_one_line(tree, guarded):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Denied(MemoryFileSystem):
        """A remote store that refuses every write, as S3 does for a missing bucket or a read-only key."""

        protocol = "denied"

        def _open(self, path, mode="rb", **kwargs):
            if "w" in mode:
                raise PermissionError("Access Denied")
            return super()._open(path, mode, **kwargs)

    fsspec.register_implementation("denied", Denied, clobber=True)
    result = CliRunner().invoke(cli.app, ["run", "--input", str(tree / "shards"), "--out", "denied://bucket/out"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--out 'denied://bucket/out' cannot be written: PermissionError: Access Denied" in result.stderr


def test_a_writable_remote_out_passes_the_probe_and_keeps_nothing_of_it():
    import fsspec

    from bicro_clean.pipeline.outlock import output_problem

    assert output_problem("memory://probe-bucket/out") is None
    assert not fsspec.filesystem("memory").glob("/probe-bucket/out/.bicro-clean-probe-*")
