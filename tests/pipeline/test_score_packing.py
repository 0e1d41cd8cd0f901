"""The score stage packs the rows of consecutive shards into shared model calls: a small shard no longer pays for a
whole padded scoring chunk, and no byte of any scores file changes, whatever the grouping."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import tiny_config
from bicro_clean.pipeline.run import run_pipeline
from bicro_clean.pipeline.score import score_shard, score_shards, shared_model
from bicro_clean.pipeline.shards import expand_shard_spec


def _scores(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "scores").glob("*.parquet"))}


def _clear(out: Path) -> None:
    for path in (out / "scores").glob("*.parquet"):
        path.unlink()


def test_shards_scored_together_give_the_bytes_of_shards_scored_alone(tiny_shards, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = tiny_config(str(tiny_shards / "*.tar"), out)
    summary = run_pipeline(config, report=False)
    checkpoint, shards = summary["checkpoint"], list(expand_shard_spec(config.input))
    alone = _scores(out)
    assert len(alone) == 4

    model = shared_model(checkpoint)
    calls = []
    monkeypatch.setattr(model, "score", lambda *args, _score=model.score, **kwargs: calls.append(len(args[0])) or
                        _score(*args, **kwargs))
    for groups, model_calls in (([shards], 1), ([shards[:1], shards[1:]], 2), ([[s] for s in shards], 4)):
        _clear(out)
        calls.clear()
        for group in groups:
            assert score_shards(group, str(out), checkpoint) == [False] * len(group)
        assert _scores(out) == alone
        assert len(calls) == model_calls  # one model call per group of small shards, not one per shard
    assert score_shards(shards, str(out), checkpoint) == [True] * 4  # current files are reused, not rescored
    _clear(out)
    assert Path(score_shard(shards[0], str(out), checkpoint)).exists() and len(_scores(out)) == 1
