"""Fit once, score anywhere, through the CLI in child processes as a user runs it (decode workers on, the embed
defaults; only the encoder, tiny, and BiCro are shrunk):

- one run fits; `run --checkpoint` over all shards scores with that model without refitting;
- the crawl split into two partitions, run as two `bicro-clean run --checkpoint` processes in parallel with
  different --out (under `--runner none` and the default Prefect runner), gives every row the annotated row and
  the kept keys of the one run with that checkpoint;
- `bicro-clean select --from 'parts/*'` decides the partitions as one run: the keys repeated across partitions
  (which a partition alone cannot see) and a run-wide `--keep-fraction`, computed once (`--write-plan`) and
  applied per partition (`--plan`), give the one run's rows and kept set;
- a checkpoint folder that is missing, incomplete or fitted on another encoder, and `--device cuda` on a machine
  without CUDA, are refused before any work: exit 2, one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import TINY_BICRO

BIN = Path(sys.executable).parent
RUNNERS = {"none": ("--runner", "none"), "prefect": ()}
SPLIT_TOGETHER = (("00000.tar", "extra.tar"), ("00001.tar", "00002.tar"))  # extra.tar repeats a key of 00000.tar
SPLIT_APART = (("00000.tar", "00001.tar"), ("00002.tar", "extra.tar"))  # ... here in another partition


def _env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(cwd / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _command(config: Path, *args: str) -> list[str]:
    return [str(BIN / "bicro-clean"), "-q", "run", "-c", str(config), *args]


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`bicro-clean ARGS` in a child process with a private ephemeral Prefect home."""
    return subprocess.run([str(BIN / "bicro-clean"), *args], cwd=cwd, env=_env(cwd), capture_output=True, text=True,
                          timeout=900, check=False)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _config(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"embed": {"encoder": "tiny", "batch_size": 8, "progress": False},
                                    "bicro": TINY_BICRO}))
    return path


def _run(cwd: Path, config: Path, *args: str) -> None:
    _ok(_cli(cwd, "-q", "run", "-c", str(config), *args))


def _partitions_in_parallel(cwd: Path, config: Path, shards: Path, checkpoint: str, split: tuple, prefix: str,
                            runner: tuple[str, ...]) -> list[Path]:
    """Two `bicro-clean run --checkpoint` processes at once, one per partition, each with its own --out."""
    procs = []
    for index, names in enumerate(split):
        inputs = [arg for name in names for arg in ("-i", str(shards / name))]
        out = cwd / f"{prefix}-{index}"
        procs.append((out, subprocess.Popen(_command(config, *inputs, "-o", str(out), "--checkpoint", checkpoint,
                                                     *runner), cwd=cwd, env=_env(cwd), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)))
    for _, proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, (stdout + stderr)[-4000:]
    return [out for out, _ in procs]


# Where a kept row went in the cleaned shards: each output folder numbers its own shards from 00000.tar, so a
# partition's places differ from the one run's (the kept rows are the same).
PLACES = ("output_shard", "output_index")


def _rows(*outputs: Path) -> dict[tuple[str, str], dict]:
    """Every annotated row of the output folders, by (shard, key), less where it went in the cleaned shards."""
    rows = {}
    for out in outputs:
        for path in sorted((out / "annotated").glob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                rows[(row["shard"], row["key"])] = {k: v for k, v in row.items() if k not in PLACES}
    return rows


def _kept(*outputs: Path) -> list[tuple]:
    return sorted(tuple(row.values()) for out in outputs
                  for row in pq.read_table(out / "keep_keys.parquet").to_pylist())


def _same_rows(one: Path, parts: list[Path]) -> None:
    expected, got = _rows(one), _rows(*parts)
    assert got.keys() == expected.keys()
    differing = {key: {c: (expected[key][c], got[key][c]) for c in expected[key] if expected[key][c] != got[key][c]}
                 for key in expected if expected[key] != got[key]}
    assert not differing
    assert _kept(*parts) == _kept(one)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory, tiny_shards) -> dict:
    """A fit over the whole crawl, and one run over all shards with its checkpoint (threshold and keep-fraction)."""
    root = tmp_path_factory.mktemp("fit-once")
    config = _config(root)
    _run(root, config, "-i", str(tiny_shards), "-o", str(root / "fit"), "--runner", "none")
    (checkpoint,) = (root / "fit" / "checkpoint").iterdir()
    for out, extra in (("one", ()), ("one-fraction", ("--keep-fraction", "0.5"))):
        _run(root, config, "-i", str(tiny_shards), "-o", str(root / out), "--runner", "none", "--checkpoint",
             str(checkpoint), *extra)
    return {"root": root, "config": config, "shards": tiny_shards, "checkpoint": str(checkpoint)}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_run_with_a_checkpoint_scores_with_it_and_fits_nothing(crawl):
    root, checkpoint = crawl["root"], Path(crawl["checkpoint"])
    copies = list((root / "one" / "checkpoint").iterdir())
    assert [c.name for c in copies] == [checkpoint.name]  # the given model, under its name: nothing else was fitted
    assert _files(copies[0]) == _files(checkpoint)
    manifest = json.loads((root / "one" / "manifest.json").read_text())
    assert manifest["checkpoint"] == json.loads((root / "fit" / "manifest.json").read_text())["checkpoint"]
    assert _rows(root / "one") == _rows(root / "fit")  # the same model on the same embeddings: the fit run's rows


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_partitions_run_in_parallel_give_the_rows_of_one_run(crawl, runner):
    root = crawl["root"]
    parts = _partitions_in_parallel(root, crawl["config"], crawl["shards"], crawl["checkpoint"], SPLIT_TOGETHER,
                                    f"part-{runner}", RUNNERS[runner])
    _same_rows(root / "one", parts)


@pytest.mark.slow
def test_select_across_partitions_gives_the_repeated_keys_and_the_keep_fraction_of_one_run(crawl):
    root = crawl["root"]
    parts = _partitions_in_parallel(root, crawl["config"], crawl["shards"], crawl["checkpoint"], SPLIT_APART,
                                    "apart", RUNNERS["none"])
    one, got = _rows(root / "one"), _rows(*parts)
    renamed = [key for key, row in one.items() if row["output_key"] != row["key"]]
    assert renamed and all(got[key]["output_key"] == key[1] for key in renamed)  # a partition alone cannot see them

    _ok(_cli(root, "-q", "select", "--from", str(root / "apart-*")))  # the partitions' own rule, keys across them
    _same_rows(root / "one", parts)

    plan = root / "plan.json"
    _ok(_cli(root, "-q", "select", "--from", str(root / "apart-*"), "--keep-fraction", "0.5", "--write-plan",
             str(plan)))
    cutoff = json.loads(plan.read_text())["cutoff"]
    assert cutoff == json.loads((root / "one-fraction" / "manifest.json").read_text())["cutoff"]
    for part in parts:  # each partition's host applies the plan to its own folder
        _ok(_cli(root, "-q", "select", "--from", str(part), "--plan", str(plan)))
    _same_rows(root / "one-fraction", parts)
    assert 0 < len(_kept(*parts)) < len(got)
    for part in parts:  # each partition's cleaned shards: numbered from 00000.tar, its kept rows in them, in order
        sizes = json.loads((part / "shards" / "sizes.json").read_text())
        kept = [r for r in pq.read_table(str(part / "filtered")).to_pylist()]
        assert sorted(sizes) == [f"{i:05d}.tar" for i in range(len(sizes))] and sum(sizes.values()) == len(kept)
        assert sorted((r["output_shard"], r["output_index"]) for r in kept) == [
            (name, i) for name, count in sorted(sizes.items()) for i in range(count)]


def _refused(done: subprocess.CompletedProcess, kind: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"{kind} error: ") and "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.parametrize("runner", RUNNERS)
def test_an_unusable_checkpoint_is_refused_before_any_work(crawl, tmp_path, runner):
    root, checkpoint = crawl["root"], Path(crawl["checkpoint"])
    incomplete = tmp_path / "bicro-cut"
    incomplete.mkdir()
    (incomplete / "tensors.safetensors").write_bytes((checkpoint / "tensors.safetensors").read_bytes())
    cases = {str(tmp_path / "nowhere"): "not a checkpoint folder", str(root / "fit"): "not a checkpoint folder",
             str(incomplete): "model.json, encoder.json missing"}
    for folder, said in cases.items():
        out = tmp_path / "out"
        line = _refused(_cli(root, "run", "-c", str(crawl["config"]), "-i", str(crawl["shards"]), "-o", str(out),
                             "--checkpoint", folder, *RUNNERS[runner]), "checkpoint")
        assert said in line and not (out / "embeddings").exists()
    line = _refused(_cli(root, "run", "-c", str(crawl["config"]), "-i", str(crawl["shards"]), "-o", str(tmp_path / "o"),
                         "--checkpoint", str(checkpoint), "--encoder", "towers", *RUNNERS[runner]), "checkpoint")
    assert "'tiny'" in line and "'towers'" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_asked_for_without_cuda_fails_at_once(tiny_shards, tmp_path, device):
    config = _config(tmp_path)
    line = _refused(_cli(tmp_path, "run", "-c", str(config), "-i", str(tiny_shards), "-o", str(tmp_path / "out"),
                         "--device", device), "device")
    assert device in line and not (tmp_path / "out" / "embeddings").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_worker_asked_for_cuda_without_it_fails_with_one_line():
    """What a task on a worker without CUDA raises (embed's encoder, score's model): one line, never the CPU."""
    from bicro_clean.models.devices import DeviceUnavailableError
    from bicro_clean.models.encoders import resolve_device
    from bicro_clean.pipeline.score import device

    for asked in ("cuda", "cuda:1"):
        for choose in (resolve_device, device):
            with pytest.raises(DeviceUnavailableError, match=f"device {asked} was asked for") as caught:
                choose(asked)
            assert "\n" not in str(caught.value)
    assert str(resolve_device("auto")) == device("auto") == device("cpu") == "cpu"


def test_the_flow_refuses_an_unusable_checkpoint_before_any_work(tiny_shards, tmp_path):
    """The sequence itself checks (a deployment's flow run gets no CLI in front of it)."""
    from bicro_clean.pipeline.checkpoint_use import CheckpointError
    from bicro_clean.pipeline.config import CleanConfig
    from bicro_clean.pipeline.run import run_pipeline

    config = CleanConfig.model_validate({"input": str(tiny_shards), "output": str(tmp_path / "out"),
                                         "embed": {"encoder": "tiny"}, "checkpoint": str(tmp_path / "nowhere")})
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        run_pipeline(config)
    assert not (tmp_path / "out" / "embeddings").exists()
