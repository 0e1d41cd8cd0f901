"""report.html depends only on the run's data and settings: the same crawl written into two output folders, or
made by another runner (none, local threads, a Dask cluster that scans the annotated files in groups), gives the
same page bytes. The output folder's path is not on the page: its commands name it OUT."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import TINY_BICRO, TINY_EMBED
from report_fixture import Options, build_run, config_of

from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.report import write_report

# The tiny encoder with the default decode workers: runner paths are tested as users run them.
EMBED = {k: v for k, v in TINY_EMBED.items() if k != "num_workers"}


def _digest(page: Path) -> str:
    return hashlib.sha256(page.read_bytes()).hexdigest()


def test_the_same_outputs_in_another_folder_write_the_same_page(tmp_path):
    """A finished run's outputs copied to another folder (the same manifest and annotated files, the same input
    shards): its report is the original's bytes, and neither page names either folder."""
    first = build_run(tmp_path / "a", Options(images=24))
    second = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, second)
    (second / "report.html").unlink()
    write_report(config_of(second), str(second / "manifest.json"))
    page = (second / "report.html").read_text(encoding="utf-8")
    assert page == (first / "report.html").read_text(encoding="utf-8")
    assert str(first) not in page and str(second) not in page
    assert "select --from OUT" in page and "--out OUT " in page


def _params(shards: Path, out: Path, runner: str) -> dict:
    return {"input": str(shards / "*.tar"), "output": str(out), "embed": EMBED, "bicro": TINY_BICRO,
            "out": {"maxcount": 3}, "runner": {"kind": runner, **({"workers": 2} if runner == "dask" else {})}}


@pytest.fixture
def prefect_home(tmp_path, monkeypatch):
    """An isolated Prefect home for the ephemeral API, so the test never touches the user's database."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


@pytest.mark.slow
def test_two_output_folders_and_every_runner_write_the_same_report(tiny_shards, tmp_path, prefect_home):
    """Two `--runner none` runs of the same shards into two folders, then a local (threads) and a Dask (2
    workers, the report's scan mapped over groups of annotated files) run: four byte-identical report.html."""
    from bicro_clean.flows.clean_shards import run_flow
    from bicro_clean.pipeline.run import run_pipeline

    pages = {}
    for name in ("none-a", "none-b"):
        run_pipeline(CleanConfig.model_validate(_params(tiny_shards, tmp_path / name, "none")))
        pages[name] = tmp_path / name / "report.html"
    for runner in ("local", "dask"):
        run_flow(CleanConfig.model_validate(_params(tiny_shards, tmp_path / runner, runner)))
        pages[runner] = tmp_path / runner / "report.html"
    digests = {name: _digest(page) for name, page in pages.items()}
    assert len(set(digests.values())) == 1, digests
    text = pages["none-a"].read_text(encoding="utf-8")
    assert str(tmp_path) not in text.replace(str(tiny_shards), "")  # only the input's path, never an output's
