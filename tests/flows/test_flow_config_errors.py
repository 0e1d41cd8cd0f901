"""A flow run (a deployment's parameters, or clean_shards called with a dict) with a bad config fails before any
work, with the config's one-line message, as `bicro-clean run` does (tests/pipeline/test_config_errors.py). Here,
under tests/flows, because it runs a Prefect flow in the test process."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_a_flow_run_with_a_bad_config_fails_before_embedding(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from conftest import TINY_BICRO

    from bicro_clean.flows.clean_shards import clean_shards

    out = tmp_path / "out"
    cases = [({"embed": {"encoder": "tower"}, "bicro": TINY_BICRO},
              "config.embed.encoder: Value error, unknown encoder 'tower' (did you mean 'towers'?)"),
             ({"embed": {"encoder": "tiny"}, "bicro": {**TINY_BICRO, "fit_sample": 1}},
              "config.bicro.fit_sample: Value error, 1 is too small: 0 (every pair) or at least 2")]
    for sections, expected in cases:
        state = clean_shards(config={"input": str(tiny_shards), "output": str(out), **sections}, return_state=True)
        assert state.is_failed() and "Validation of flow parameters failed" in state.message, state.message
        assert expected in state.message, state.message
        assert not Path(out, "embeddings").exists()
