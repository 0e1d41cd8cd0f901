"""pipeline/owner.py without a run: which inputs lie inside --out, what counts as another configuration, and the
owner record on a local folder and on a remote store (fsspec's in-memory filesystem stands in for S3: non-local,
no rename). The whole runs are tests/e2e/test_output_owner.py."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import fsspec
import pytest

from bicro_clean.pipeline import resume
from bicro_clean.pipeline.owner import (
    OutputOwnedError,
    claim_output,
    differing_fields,
    outside_output,
    owner_problem,
    recorded_owner,
)
from bicro_clean.pipeline.shards import MissingInputError
from conftest import tiny_config


def test_inputs_inside_out_are_skipped_however_they_are_spelled(tmp_path: Path, monkeypatch, caplog) -> None:
    out, other = tmp_path / "clean", tmp_path / "clean2"  # a sibling sharing the prefix is not inside
    for folder in (out / "shards", other):
        folder.mkdir(parents=True)
    inside, outside = out / "shards" / "a.tar", other / "b.tar"
    link = tmp_path / "link.tar"
    link.symlink_to(inside)  # resolves into --out
    monkeypatch.chdir(tmp_path)
    shards = [str(inside), "./clean/shards/a.tar", "clean/../clean/shards/a.tar", f"file://{inside}", str(link),
              str(outside), "pipe:cat x.tar"]
    config = tiny_config("ignored", "clean/")
    with caplog.at_level("WARNING", logger="bicro_clean.pipeline.owner"):
        assert outside_output(config, shards) == [str(outside), "pipe:cat x.tar"]
    assert "skipped 5 of 7 shards inside --out" in caplog.text


def test_remote_inputs_inside_a_remote_out_are_skipped() -> None:
    base = f"memory://owner-{uuid.uuid4().hex}"
    config = tiny_config("ignored", f"{base}/out/")
    shards = [f"{base}/out/shards/a.tar", f"simplecache::{base}/out/shards/b.tar", f"{base}/outside/c.tar",
              f"{base}/out2/d.tar", "https://example.com/out/e.tar"]
    assert outside_output(config, shards) == shards[2:]


def test_nothing_left_outside_out_is_the_one_line_missing_input_error(tmp_path: Path) -> None:
    config = tiny_config(str(tmp_path / "out" / "*.tar"), tmp_path / "out")
    with pytest.raises(MissingInputError, match=r"^no shard matches .* outside --out .*the 2 found there"):
        outside_output(config, [str(tmp_path / "out" / "a.tar"), str(tmp_path / "out" / "b.tar")])


def test_differing_fields_are_dotted_in_declaration_order_and_ignore_fields_one_side_lacks() -> None:
    old = {"reader": {"max_caption_bytes": 10}, "embed": {"encoder": "towers", "dtype": "float16"},
           "select": {"threshold": 0.5}, "gone": 1}
    new = {"reader": {"max_caption_bytes": 10, "added": 3}, "embed": {"encoder": "tiny", "dtype": "float16"},
           "select": {"threshold": 0.7}}
    assert differing_fields(old, new) == [("embed.encoder", "towers", "tiny"), ("select.threshold", 0.5, 0.7)]


def test_overwrite_changes_no_hash() -> None:
    plain, overwrite = tiny_config("x", "y"), tiny_config("x", "y", out={"overwrite": True})
    assert overwrite.out.overwrite and resume.config_hash(plain) == resume.config_hash(overwrite)
    assert plain.out.digest() == overwrite.out.digest()  # section digests key the stage caches


@pytest.mark.parametrize("where", ["local", "memory"])
def test_the_owner_record_refuses_another_configuration_unless_overwrite(tmp_path: Path, where: str) -> None:
    out = str(tmp_path / "out") if where == "local" else f"memory://owner-{uuid.uuid4().hex}/out"
    fs, root = fsspec.core.url_to_fs(out)
    first = tiny_config("x", out)
    assert owner_problem(first) is None and recorded_owner(out) is None
    claim_output(first)
    record = json.loads(fs.cat_file(f"{root}/run-config.json"))
    assert record == {"config_hash": resume.config_hash(first), "config": recorded_owner(out)}
    claim_output(tiny_config("other-inputs", out, runner={"kind": "none"}, embed={"num_workers": 1}))  # same owner

    other = tiny_config("x", out, select={"threshold": 0.7})
    problem = owner_problem(other)
    assert problem and "select.threshold 0.5 -> 0.7" in problem and "--overwrite" in problem
    assert "every score is reused" in problem and "\n" not in problem
    with pytest.raises(OutputOwnedError, match="select.threshold"):
        claim_output(other)
    assert json.loads(fs.cat_file(f"{root}/run-config.json")) == record  # untouched

    fs.pipe_file(f"{root}/manifest.json", b"{}")
    taking_over = tiny_config("x", out, select={"threshold": 0.7}, out={"overwrite": True})
    assert owner_problem(taking_over) is None
    claim_output(taking_over)
    assert recorded_owner(out)["select"]["threshold"] == 0.7
    assert not fs.exists(f"{root}/manifest.json")  # the previous owner's manifest went with it


def test_a_folder_written_before_the_record_is_owned_by_its_manifest_config(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    earlier = tiny_config("x", out, embed={"encoder": "towers"})
    config = earlier.model_dump(mode="json", exclude={"output": True, "runner": True, "embed": resume.RUNTIME_ONLY})
    (out / "manifest.json").write_text(json.dumps({"config": config}))
    problem = owner_problem(tiny_config("y", out))
    assert problem and "embed.encoder 'towers' -> 'tiny'" in problem
    assert "input" not in problem.split("(")[1].split(";")[0]  # other inputs are not another configuration
    assert os.listdir(out) == ["manifest.json"]


def test_a_run_scored_with_another_fitted_model_is_another_owner(tmp_path: Path) -> None:
    out = tmp_path / "out"
    claim_output(tiny_config("x", out))  # fitted its own model
    # only the folder name matters to the owner record (whether the folder is usable is checkpoint_use's check)
    given = tiny_config("x", out).model_copy(update={"checkpoint": str(tmp_path / "fit/checkpoint/bicro-abc123/")})
    problem = owner_problem(given)
    assert problem and "checkpoint None -> 'bicro-abc123'" in problem
    claim_output(given.model_copy(update={"out": given.out.model_copy(update={"overwrite": True})}))
    assert recorded_owner(str(out))["checkpoint"] == "bicro-abc123"
    moved = given.model_copy(update={"checkpoint": "s3://bucket/models/bicro-abc123"})  # the same model elsewhere
    assert owner_problem(moved) is None
