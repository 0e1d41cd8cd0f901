"""The distribution as a user installs it: a regular (non-editable) wheel whose only top-level import package is
`bicro_clean`, and whose `bicro-clean` entry point runs a whole cleaning job from a fresh venv.

The fresh venv layers over this venv's site-packages (a .pth line, as tests/e2e/test_downstream.py does) for
torch and the other dependencies, and gets the wheel itself with --no-deps: only our code is new. The editable
install of the development venv is invisible there (its .pth finder is not processed from a layered folder),
and the commands run outside the repository, so nothing can be imported from the working tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import image_folder

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: setuptools builds in place, and a build/ folder left in the checkout would carry
    # modules deleted since into the next wheel.
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    # The venv's own setuptools (no build isolation): nothing is downloaded.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, env=_env(), cwd=out)
    (path,) = out.glob("bicro_clean-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_env())
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=_env()).stdout.strip()
    (Path(site) / "zz-bicro-base-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                    str(wheel)], check=True, env=_env())
    return venv


def test_the_wheel_has_one_top_level_import_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"bicro_clean"}
    assert "bicro_clean/pipeline/report/report.css" in names  # package data travels with the code
    for package in ("pipeline", "models", "flows", "lab"):
        assert f"bicro_clean/{package}/__init__.py" in names


def test_the_entry_point_runs_a_whole_job_from_the_installed_wheel(fresh_venv, tmp_path):
    env, exe = _env(), str(fresh_venv / "bin" / "bicro-clean")
    where = subprocess.run([str(fresh_venv / "bin" / "python"), "-c",
                            "import bicro_clean.pipeline.run as m; print(m.__file__)"],
                           capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout
    assert str(fresh_venv) in where  # the installed copy, not the working tree
    images, captions = image_folder(tmp_path / "data", 6, (16, 16), lambda i: [f"picture {i}", f"colour {i}"])
    subprocess.run([exe, "make-shards", "--images", str(images), "--captions", str(captions),
                    "--out", str(tmp_path / "shards"), "--shard-size", "6"], check=True, env=env, cwd=tmp_path)
    config = {"embed": {"encoder": "tiny", "num_workers": 0, "progress": False},
              "bicro": {"embed_dim": 16, "hidden_dim": 32, "epochs": 2, "warmup_epochs": 1, "batch_size": 8}}
    (tmp_path / "run.json").write_text(json.dumps(config))  # YAML is a superset of JSON
    # --quiet: the summary as one JSON line
    done = subprocess.run([exe, "--quiet", "run", "-c", str(tmp_path / "run.json"),
                           "--input", str(tmp_path / "shards/*.tar"), "--out", str(tmp_path / "out"), "--runner", "none"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["in"] == 12 and summary["errors"] == 0
    assert (tmp_path / "out" / "report.html").read_text().count("<svg") >= 3  # the CSS and plots shipped
