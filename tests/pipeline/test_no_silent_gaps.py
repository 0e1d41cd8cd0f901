"""Nothing a user expects goes missing without a word: why keep_uids.npy was not written, the run's estimates in
its summary, a folder of images given as --input, and help text the markup must not eat."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from bicro_clean import cli
from bicro_clean.cli_support import TERMINAL
from bicro_clean.pipeline.finalize import KEEP_UIDS, write_keep_uids
from bicro_clean.pipeline.layout import MANIFEST
from bicro_clean.pipeline.manifest_shards import summary_fields
from bicro_clean.pipeline.shards import MissingInputError, expand_shard_spec
from bicro_clean.pipeline.writers import OutputShard
from bicro_clean.run_summary import print_run_summary


def _invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"})


# ------------------------------------------------------------------------------------------------ keep_uids


def test_keep_uids_says_how_many_kept_samples_lack_a_usable_uid(tmp_path):
    uids = [hashlib.md5(str(n).encode()).hexdigest() for n in range(3)] + [None, None, "not-a-uid"]
    keep_keys = tmp_path / "keep_keys.parquet"
    pq.write_table(pa.table({"shard": ["s"] * 6, "key": [str(n) for n in range(6)],
                             "uid": pa.array(uids, pa.string())}), keep_keys)
    assert write_keep_uids(str(keep_keys), str(tmp_path / KEEP_UIDS)) == (
        "not written: 2 of 6 kept samples have no uid (img2dataset's `uid` field in the sample's .json); 1 of 6 "
        "kept samples have a uid that is not 32 hex digits (DataComp's format)")
    assert not (tmp_path / KEEP_UIDS).exists()


def test_the_summary_takes_the_file_or_the_reason_from_the_manifest(tmp_path):
    reason = "not written: 4 of 4 kept samples have no uid (img2dataset's `uid` field in the sample's .json)"
    found = {"noise_share": 0.25, "kept_precision": 0.9, "clean_lost": 1.2, "scored": 8}
    (tmp_path / MANIFEST).write_text(json.dumps({"outputs": [], "keep_uids": reason, "estimates": found}))
    assert summary_fields(str(tmp_path)) == {"keep_uids": reason, "estimates": found}
    written = [{"path": KEEP_UIDS, "kind": "keep_uids", "count": 4, "sha256": "x"}]
    (tmp_path / MANIFEST).write_text(json.dumps({"outputs": written, "keep_uids": KEEP_UIDS, "estimates": found}))
    assert summary_fields(str(tmp_path))["keep_uids"] == str(tmp_path / KEEP_UIDS)


def test_run_summary_prints_the_estimates_and_why_there_are_no_uids(capsys, monkeypatch):
    monkeypatch.setitem(TERMINAL, "mode", "default")
    summary = {"in": 10, "kept": 6, "dropped": 3, "errors": 1, "by_reason": {"kept": 6, "low_clean_score": 3},
               "output": "out", "shards": 1, "total_seconds": 3.0,
               "keep_uids": "not written: 6 of 6 kept samples have no uid (img2dataset's `uid` field)",
               "estimates": {"noise_share": 0.382, "kept_precision": 0.951, "clean_lost": 0.6, "scored": 9}}
    print_run_summary(summary)
    out = capsys.readouterr().out
    assert "keep_uids not written: 6 of 6 kept samples have no uid (img2dataset's `uid` field)" in out
    assert "estimated noise 38.2% of 9 scored pairs; kept pairs expected 95.1% clean; ~1 clean pairs dropped" in out


# ------------------------------------------------------------------------------------------------ stats


def test_stats_count_rule_drops_as_dropped_and_unreadable_samples_as_failed():
    shard = OutputShard("00000", count=6, successes=2,
                        status=Counter({"kept": 2, "low_clean_score": 2, "below_keep_fraction": 1,
                                        "decode_error": 1}))
    stats = shard.stats(["a.tar"])
    assert (stats["count"], stats["successes"], stats["dropped"], stats["failed"]) == (6, 2, 3, 1)


# ------------------------------------------------------------------------------------------------ image folders


def _images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"im{i}.jpg")
    return folder


def test_a_folder_of_images_names_make_shards(tmp_path):
    images = _images(tmp_path / "photos")
    with pytest.raises(MissingInputError) as caught:
        list(expand_shard_spec(str(images)))
    message = str(caught.value)
    assert "is a folder of images, not WebDataset shards" in message and "\n" not in message
    assert f"bicro-clean make-shards --images {images} --captions CAPTIONS.csv --out SHARDS" in message


def test_make_shards_layout_gets_its_own_paths_and_run_exits_2_in_one_line(tmp_path):
    data = tmp_path / "data"
    images = _images(data / "images")
    (data / "captions.csv").write_text("image,caption\nim0.jpg,a\n")
    result = _invoke("run", "--input", str(data), "--out", str(tmp_path / "out"), "--encoder", "tiny")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("input error: ")
    assert f"make-shards --images {images} --captions {data / 'captions.csv'} --out SHARDS" in result.stderr


def test_an_empty_folder_keeps_its_message(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match=r"has no \*\.tar shards"):
        list(expand_shard_spec(str(tmp_path / "empty")))


# ------------------------------------------------------------------------------------------------ help text


def test_make_shards_help_shows_the_split_file_format():
    result = _invoke("make-shards", "--help")
    assert result.exit_code == 0
    assert "JSON {split: [image names]}." in " ".join(result.stdout.split())
