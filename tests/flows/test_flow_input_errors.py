"""A deployment or flow run with a bad input spec fails with the CLI's one line as its state message. Here, under
tests/flows, because it runs a Prefect flow in the test process (pyproject testpaths runs flows last)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bicro_clean.pipeline.shards import InputError, expand_shard_spec


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "shards").mkdir()
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / "shards" / name).write_bytes(b"x")
    return tmp_path


@pytest.mark.slow
def test_a_flow_run_fails_with_the_same_line(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from conftest import tiny_config

    from bicro_clean.flows.clean_shards import clean_shards

    config = tiny_config(str(tree / "shards" / "{00000..00003}.tar"), tree / "out")
    with pytest.raises(InputError) as caught:
        list(expand_shard_spec(config.input))
    state = clean_shards(config=config, return_state=True)
    assert state.is_failed() and str(caught.value) in state.message
