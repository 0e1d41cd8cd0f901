"""`bicro-clean demo`: its generated data (deterministic, the make-shards layout, captions that describe the picture),
a small whole run without ../shared, `--data DIR`, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bicro_clean.lab.demo_data import (
    AIR_PLACES,
    GROUND_PLACES,
    PLURAL,
    SHOWN,
    caption,
    generate,
    random_scene,
)
from bicro_clean.pipeline.make_shards import read_caption_rows
from typer.testing import CliRunner

from bicro_clean.cli import app

SUMMARY_LINES = ("pairs:", "noise injected:", "noise found:", "AUROC clean_score vs injected truth:",
                 "mean clean_score:", "kept precision:", "report:")


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generator_is_deterministic_and_writes_the_layout(tmp_path: Path) -> None:
    assert generate(tmp_path / "a", scenes=12, captions_per_image=2, seed=3) == {"images": 12, "captions": 24}
    generate(tmp_path / "b", scenes=12, captions_per_image=2, seed=3)
    generate(tmp_path / "c", scenes=12, captions_per_image=2, seed=4)
    generate(tmp_path / "d", scenes=6, captions_per_image=2, seed=3)
    a = _digests(tmp_path / "a")
    assert a == _digests(tmp_path / "b")  # same seed: same bytes
    assert a["images/scene_00000.jpg"] != _digests(tmp_path / "c")["images/scene_00000.jpg"]
    d = _digests(tmp_path / "d")
    assert all(a[name] == digest for name, digest in d.items() if name.startswith("images/"))  # prefix-stable
    rows = read_caption_rows(tmp_path / "a" / "captions.csv")  # exactly what make-shards reads
    assert len(rows) == 24 and len({(r.image, r.caption) for r in rows}) == 24
    assert {r.image for r in rows} == {p.name for p in (tmp_path / "a" / "images").iterdir()}
    assert all(r.caption[0].isupper() and r.caption.endswith(".") for r in rows)


def test_captions_name_what_the_picture_shows() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = random_scene(rng)
        text = caption(scene, rng).lower()
        noun = scene.kind if scene.count == 1 else PLURAL.get(scene.kind, scene.kind + "s")
        assert scene.colour in text and noun in text, text
        places = GROUND_PLACES[scene.background] + AIR_PLACES[scene.background] + (SHOWN[scene.background],)
        assert any(place.lower() in text for place in places), text


def _check_summary(stdout: str, pairs: int) -> None:
    lines = stdout.strip().splitlines()
    for prefix in SUMMARY_LINES:
        assert any(line.startswith(prefix) for line in lines), (prefix, stdout)
    assert lines[0].startswith(f"pairs:           {pairs:,} ")
    assert f"{int(pairs * 0.4):,} captions shuffled (40.0%)" in stdout


@pytest.mark.slow
def test_small_demo_runs_without_shared(tmp_path: Path) -> None:
    """The demo in a child whose cwd has no ../shared: a fresh clone's situation (tiny encoder, no Prefect, 2
    epochs: ~20 s idle, a minute under load: slow)."""
    work = tmp_path / "clone" / "repo"
    work.mkdir(parents=True)
    assert not (work.parent / "shared").exists()
    script = Path(sys.executable).with_name("bicro-clean")
    env = {k: v for k, v in os.environ.items() if k not in ("BICRO_DATA", "PREFECT_API_URL")}
    result = subprocess.run([str(script), "demo", "--images", "150", "--encoder", "tiny", "--runner", "none",
                             "--epochs", "2"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_summary(result.stdout, 300)
    assert "150 generated scenes" in result.stdout
    summary = json.loads((work / "demo-out" / "demo-summary.json").read_text())
    assert summary["demo"]["noise_injected"] == 120 and Path(work / summary["demo"]["report"]).is_file()
    assert 0.0 <= summary["demo"]["auroc_soft_label"] <= 1.0 and 0.0 <= summary["demo"]["auroc_clean_score"] <= 1.0
    assert 0.0 <= summary["demo"]["mean_clean_score"] <= 1.0


def test_demo_takes_any_data_folder(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "mydata"
    generate(data, scenes=60, captions_per_image=3, seed=9)
    (data / "splits.json").write_text(json.dumps({"train": [f"scene_{i:05d}.jpg" for i in range(50)],
                                                  "test": [f"scene_{i:05d}.jpg" for i in range(50, 60)]}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--data", str(data), "--out", "o", "--images", "40",
                                      "--encoder", "tiny", "--runner", "none", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    _check_summary(result.stdout, 120)  # 40 train images x 3 captions
    assert f"({data})" in result.stdout


def test_demo_bad_data_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["demo", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"demo error: demo data not found: {tmp_path / 'empty'} needs "
                                                  "images/ and captions.csv"]
