"""Issue 16, defect 2: a shard file name that looks like a pipe or URL is a file, never a command.

Only a spec the user typed may be a `pipe:` URL. A name that a glob or folder listing found (``pipe:touch X;x.tar``,
``http:x.tar``) is read as the local file it is, with or without allow_pipe, and nothing is executed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from conftest import image_bytes, tar_bytes, tiny_config
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import read_shard
from bicro_clean.pipeline.shards import RawSample, UnsafeInputError, expand_shard_spec, shard_id
from bicro_clean.pipeline.tar_reader import iter_shard

WEIRD = "pipe:touch X;x.tar"  # as a command: creates X in the working directory


def _shard(path: Path, prefix: str, count: int = 8) -> Path:
    members = []
    for i in range(count):
        colour = ((37 * i + len(prefix) * 50) % 256, (255 - 29 * i) % 256, (90 * i) % 256)
        members += [(f"{prefix}{i}.png", image_bytes("PNG", color=colour)), (f"{prefix}{i}.txt",
                                                                              f"{prefix} picture {i}".encode())]
    path.write_bytes(tar_bytes(members))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "shards"
    root.mkdir()
    _shard(root / "00000.tar", "plain")
    _shard(root / WEIRD, "weird")
    return root


def _no_x(*places: Path) -> None:
    for place in places:
        assert not (place / "X").exists(), f"the file name was run as a command: {place / 'X'} exists"


def _keys(url: str, config: ReaderConfig) -> list[str]:
    return [item.key for item in iter_shard(url, config) if isinstance(item, RawSample)]


@pytest.mark.parametrize("allow_pipe", [False, True])
def test_a_globbed_pipe_name_is_a_local_file(folder, tmp_path, monkeypatch, allow_pipe):
    urls = list(expand_shard_spec(str(folder / "*.tar"), allow_pipe=allow_pipe))
    assert [os.path.basename(u) for u in urls] == ["00000.tar", WEIRD]
    assert all(u.startswith("/") for u in urls)
    assert list(expand_shard_spec(str(folder), allow_pipe=allow_pipe)) == urls  # a folder: its listing
    config = ReaderConfig(allow_pipe=allow_pipe)
    assert _keys(urls[1], config) == [f"weird{i}" for i in range(8)]
    monkeypatch.chdir(tmp_path)  # a relative glob, as typed in a shell: the match is "shards/pipe:..."
    relative = list(expand_shard_spec("shards/*.tar", allow_pipe=allow_pipe))
    assert relative == ["shards/00000.tar", "./shards/" + WEIRD]
    assert list(expand_shard_spec("shards", allow_pipe=allow_pipe)) == relative
    assert _keys(relative[1], config) == [f"weird{i}" for i in range(8)]
    monkeypatch.chdir(folder)  # the match itself starts with "pipe:"
    here = list(expand_shard_spec("*.tar", allow_pipe=allow_pipe))
    assert here == ["00000.tar", "./" + WEIRD]
    assert _keys(here[1], config) == [f"weird{i}" for i in range(8)]
    decoded = [item for item in read_shard(here[1], config) if not hasattr(item, "reason")]
    assert [item.caption for item in decoded][:2] == ["weird picture 0", "weird picture 1"]
    _no_x(folder, tmp_path, Path.cwd())


def test_ordinary_shard_ids_do_not_change(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    typed = shard_id("shards/00000.tar")
    assert shard_id(str(folder / "00000.tar")) == typed
    assert shard_id(list(expand_shard_spec("shards/*.tar"))[0]) == typed
    assert shard_id(list(expand_shard_spec(str(folder)))[0]) == typed
    # the weird name's id is the id of its absolute path, however it was found
    weird = {shard_id(u) for u in ["./shards/" + WEIRD, str(folder / WEIRD), *expand_shard_spec("shards/*.tar")]}
    assert len(weird) == 2  # 00000.tar and the weird one


@pytest.mark.parametrize("name", ["http:x.tar", "s3:x.tar", "a::b.tar", "file:x.tar"])
def test_a_globbed_url_like_name_is_a_local_file(tmp_path, monkeypatch, name):
    _shard(tmp_path / name, "u", count=2)
    monkeypatch.chdir(tmp_path)
    for spec in ["*.tar", str(tmp_path / "*.tar"), "."]:
        (url,) = expand_shard_spec(spec)
        assert url.startswith(("/", "./")) and url.endswith(name)
        assert _keys(url, ReaderConfig()) == ["u0", "u1"]


def test_a_typed_pipe_is_still_a_pipe_and_refused_without_allow_pipe(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = f"pipe:cat {folder / '00000.tar'}"
    with pytest.raises(UnsafeInputError, match="pipe:") as refused:
        list(expand_shard_spec(spec))
    assert "\n" not in str(refused.value)
    with pytest.raises(UnsafeInputError):
        list(iter_shard(spec, ReaderConfig()))
    assert list(expand_shard_spec(spec, allow_pipe=True)) == [spec]
    assert _keys(spec, ReaderConfig(allow_pipe=True)) == [f"plain{i}" for i in range(8)]
    typed = f"pipe:touch {tmp_path / 'Y'}; cat {folder / '00000.tar'}"  # typed, allowed: it does run
    assert _keys(typed, ReaderConfig(allow_pipe=True)) == [f"plain{i}" for i in range(8)]
    assert (tmp_path / "Y").exists()


@pytest.fixture
def tiny_encoder():
    from bicro_clean.models.encoders import _register_tiny_config

    _register_tiny_config()


def test_a_whole_run_reads_the_pipe_named_shard_as_a_file(folder, tmp_path, monkeypatch, tiny_encoder):
    from bicro_clean.pipeline.run import run_pipeline

    monkeypatch.chdir(folder)
    run_pipeline(tiny_config("*.tar", tmp_path / "out"))  # allow_pipe off: no abort
    _check_run(tmp_path / "out", folder, tmp_path)


def test_the_cli_with_allow_pipe_does_not_run_the_name(folder, tmp_path, monkeypatch, tiny_encoder):
    from bicro_clean import cli

    bicro = {"embed_dim": 16, "hidden_dim": 32, "epochs": 2, "warmup_epochs": 1, "batch_size": 8}
    (tmp_path / "run.json").write_text(json.dumps({"embed": {"num_workers": 0, "progress": False},
                                                   "bicro": bicro}))
    monkeypatch.chdir(folder)
    result = CliRunner().invoke(cli.app, ["run", "-c", str(tmp_path / "run.json"), "--input", "*.tar", "--out",
                                          str(tmp_path / "cli"), "--encoder", "tiny", "--runner", "none",
                                          "--allow-pipe"])
    assert result.exit_code == 0, result.output
    _check_run(tmp_path / "cli", folder, tmp_path)


def _check_run(out: Path, folder: Path, tmp_path: Path) -> None:
    annotated = pl.read_parquet(str(out / "annotated" / "*.parquet"))
    by_shard = dict(annotated.group_by("shard").len().iter_rows())
    assert sorted(os.path.basename(s) for s in by_shard) == ["00000.tar", WEIRD]
    assert set(by_shard.values()) == {8}
    weird = annotated.filter(pl.col("shard").str.ends_with(WEIRD))
    assert sorted(weird["key"]) == [f"weird{i}" for i in range(8)]
    assert (weird["decision"] != "error").all()
    _no_x(folder, tmp_path, Path.cwd())
