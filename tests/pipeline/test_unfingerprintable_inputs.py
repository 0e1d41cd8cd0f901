"""An input without a cheap identity never aborts the run (issue 16, defect 3): a pipe: command, an HTTP URL that
answers 404 and a gone path each become a shard_unreadable row (or the command's samples), and the run goes on."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import polars as pl
import pytest

from bicro_clean.pipeline.parquet_io import shard_fingerprint
from bicro_clean.pipeline.run import run_pipeline
from conftest import tiny_config


@pytest.fixture
def http_root(tmp_path: Path):
    """A loopback HTTP server over tmp_path/www: files there answer 200, anything else 404."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fingerprint_falls_back_to_the_spec(tmp_path: Path) -> None:
    assert shard_fingerprint("pipe:cat x.tar").startswith("spec-")
    assert shard_fingerprint(str(tmp_path / "gone.tar")) == shard_fingerprint(str(tmp_path / "gone.tar"))


def test_pipe_http_404_and_http_200_shards_in_one_run(tiny_shards: Path, tmp_path: Path, http_root) -> None:
    root, base = http_root
    good = sorted(tiny_shards.glob("0*.tar"))
    (root / "served.tar").write_bytes(good[1].read_bytes())
    inputs = [str(good[0]), f"pipe:cat {good[2]}", f"{base}/missing.tar", f"{base}/served.tar",
              "pipe:cat /nonexistent/x.tar"]
    out = tmp_path / "out"
    summary = run_pipeline(tiny_config(inputs, out, reader={"allow_pipe": True}), report=False)
    rows = pl.read_parquet(out / "annotated" / "*.parquet")
    unreadable = rows.filter(pl.col("reason") == "shard_unreadable")
    assert summary["shards"] == 5
    assert set(unreadable["shard"].to_list()) >= {f"{base}/missing.tar"}
    served = rows.filter(pl.col("shard") == f"{base}/served.tar")
    piped = rows.filter(pl.col("shard") == f"pipe:cat {good[2]}")
    assert served.height > 1 and (served["decision"] != "error").all()
    assert piped.height > 1 and (piped["decision"] != "error").all()


@pytest.mark.slow
def test_http_shards_resume_to_identical_outputs(tiny_shards: Path, tmp_path: Path, http_root) -> None:
    """Issue 15, item 9: a brace range served over HTTP runs, a rerun reuses every shard, and a rerun after
    outputs were deleted rewrites them with the same bytes."""
    import hashlib

    root, base = http_root
    for i, shard in enumerate(sorted(tiny_shards.glob("*.tar"))):
        (root / f"{i:05d}.tar").write_bytes(shard.read_bytes())
    out, config = tmp_path / "out", tiny_config(f"{base}/{{00000..00003}}.tar", tmp_path / "out")

    def hashes() -> dict[str, str]:
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file() and ".locks" not in p.parts}

    first = run_pipeline(config)
    reference = hashes()
    assert first["shards"] == 4 and first["errors"] < first["in"]
    assert run_pipeline(config)["cached_shards"] == 4
    for path in [*out.glob("annotated/00001-*"), *out.glob("embeddings/00002-*"), out / "manifest.json"]:
        path.unlink()
    assert run_pipeline(config)["cached_shards"] == 3
    assert hashes() == reference
