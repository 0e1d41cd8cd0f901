"""An output folder has one owner, under `--runner none` and the default Prefect runner, through the CLI in child
processes as a user starts it:

- a rerun whose input glob also matches its own `--out` (`--input 'data/**/*.tar' --out data/clean`) skips its
  own cleaned shards with a note, exits 0 and leaves every file the manifest lists with its recorded sha256;
- a run with another configuration on a finished `--out` is refused before any work (exit 2, one line naming the
  differing fields and `--overwrite`), the folder untouched; with `--overwrite` it runs, reusing the caches that
  are still valid (embeddings and scores for a new threshold) and leaving a manifest that matches every file.

Decode workers stay on (the embed defaults); only the encoder (tiny) and BiCro are shrunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bicro_clean.pipeline.manifest_shards import read_manifest

from conftest import TINY_BICRO

BIN = Path(sys.executable).parent
RUNNERS = {"none": ("--runner", "none"), "prefect": ()}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _config(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"embed": {"encoder": "tiny", "batch_size": 8, "progress": False},
                                    "bicro": TINY_BICRO, "out": {"maxcount": 2}}))
    return path


def _cli(cwd: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    """`bicro-clean run -c config ARGS` in a child process with a private ephemeral Prefect home."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(cwd / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([str(BIN / "bicro-clean"), "run", "-c", str(config), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _assert_manifest_matches(out: Path) -> dict:
    manifest = read_manifest(str(out))  # manifest.json with its per-shard part
    listed = manifest["outputs"]
    assert listed
    changed = [o["path"] for o in listed if hashlib.sha256((out / o["path"]).read_bytes()).hexdigest() != o["sha256"]]
    assert changed == [], f"{len(changed)} of {len(listed)} listed files no longer match the manifest: {changed}"
    return manifest


@pytest.mark.slow
@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_a_rerun_with_out_inside_the_input_glob_skips_its_own_shards(tiny_shards, tmp_path, runner):
    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data / "raw")
    config, out = _config(tmp_path), data / "clean"
    command = ("--input", str(data / "**" / "*.tar"), "--out", str(out), *RUNNERS[runner])
    _ok(_cli(tmp_path, config, *command))
    first = _hashes(out)
    own = sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert own and _assert_manifest_matches(out)

    again = _ok(_cli(tmp_path, config, *command))
    manifest = _assert_manifest_matches(out)
    assert f"skipped {len(own)} of {len(own) + 4} shards inside --out" in again.stderr, again.stderr[-3000:]
    assert sorted(os.path.basename(i["url"]) for i in manifest["inputs"]) == sorted(
        p.name for p in (data / "raw").glob("*.tar"))
    assert _hashes(out) == first  # the identical command: the identical folder


def test_an_input_that_is_only_the_runs_own_outputs_is_one_line(tiny_shards, tmp_path):
    """A spec naming nothing but files inside --out: the usual one-line exit 2, before any work."""
    out = tmp_path / "out"
    shutil.copytree(tiny_shards, out / "shards")
    done = _cli(tmp_path, _config(tmp_path), "--input", str(out / "shards" / "*.tar"), "--out", str(out),
                "--runner", "none")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("input error: no shard matches") and "outside --out" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["shards"]  # nothing written


def _refused(done: subprocess.CompletedProcess, *fields: str) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-3000:])
    assert lines[0].startswith("output error:") and "--overwrite" in lines[0]
    for field in fields:
        assert field in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_another_configuration_is_refused_unless_overwrite(tiny_shards, tmp_path, runner):
    config, out = _config(tmp_path), tmp_path / "run1"
    command = ("--input", str(tiny_shards / "*.tar"), "--out", str(out), *RUNNERS[runner])
    _ok(_cli(tmp_path, config, *command))
    finished = _hashes(out)

    line = _refused(_cli(tmp_path, config, *command, "--encoder", "towers"), "embed.encoder")
    assert "'tiny' -> 'towers'" in line
    assert json.loads((out / "run-config.json").read_text())["config"]["embed"]["encoder"] == "tiny"
    _refused(_cli(tmp_path, config, *command, "--threshold", "0.7"), "select.threshold", "every score is reused")
    assert _hashes(out) == finished  # refused before any work: not one file written or removed

    # a new rule with --overwrite: decided again from the same embeddings and scores, nothing recomputed
    caches = {p: p.stat().st_mtime_ns for d in ("embeddings", "scores", "checkpoint") for p in (out / d).rglob("*")}
    _ok(_cli(tmp_path, config, *command, "--threshold", "0.7", "--overwrite"))
    assert {p: p.stat().st_mtime_ns for p in caches} == caches
    assert _assert_manifest_matches(out)["config"]["select"]["threshold"] == 0.7
    assert json.loads((out / "run-config.json").read_text())["config"]["select"]["threshold"] == 0.7

    # another encoder with --overwrite: the folder is the towers run's now, manifest included
    _refused(_cli(tmp_path, config, *command, "--encoder", "towers", "--threshold", "0.7"), "embed.encoder")
    _ok(_cli(tmp_path, config, *command, "--encoder", "towers", "--threshold", "0.7", "--overwrite"))
    assert _assert_manifest_matches(out)["config"]["embed"]["encoder"] == "towers"
    assert json.loads((out / "run-config.json").read_text())["config"]["embed"]["encoder"] == "towers"
