"""A remote --out (issue 15, item 9) at unit level, without a server: fsspec's in-memory filesystem stands in for
an object store (non-local, no rename). The S3 run itself is tests/e2e/test_object_store.py."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import fsspec
import pytest

from bicro_clean.pipeline.outlock import REMOTE_LOCKS, OutputBusyError, lock_folder, output_lock
from bicro_clean.pipeline.parquet_io import atomic_output
from bicro_clean.pipeline.run import run_pipeline
from conftest import tiny_config


def _memory_url() -> str:
    return f"memory://test-{uuid.uuid4().hex}/out"


def test_atomic_output_on_a_remote_filesystem_publishes_only_whole_files() -> None:
    out = _memory_url()
    fs, root = fsspec.core.url_to_fs(out)
    with atomic_output(f"{out}/a.json") as tmp:
        assert tmp.startswith("memory://")  # opened with fsspec.open: without its protocol it would be local
        with fsspec.open(tmp, "wb") as fh:
            fh.write(b"whole")
    with pytest.raises(RuntimeError), atomic_output(f"{out}/b.json") as tmp:
        with fsspec.open(tmp, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("killed mid-write")
    assert [p.rsplit("/", 1)[-1] for p in fs.find(root)] == ["a.json"]  # no partial file, no temp file
    assert fs.cat_file(f"{root}/a.json") == b"whole"


def test_a_remote_output_is_locked_in_a_local_folder_keyed_by_its_url(tmp_path: Path, monkeypatch) -> None:
    """memory:// stands for any remote store here (the lock checks the output with a probe write first)."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    folder = lock_folder("memory://lock-bucket/out")
    assert folder.startswith(os.path.join(str(tmp_path), REMOTE_LOCKS))
    assert lock_folder("memory://lock-bucket/out/") == folder != lock_folder("memory://lock-bucket/other")
    with output_lock("memory://lock-bucket/out", "aaaa"):
        with pytest.raises(OutputBusyError, match="different configuration"):
            with output_lock("memory://lock-bucket/out/", "bbbb"):
                pass
        with output_lock("memory://lock-bucket/other", "bbbb"):  # another output: no conflict
            pass


def _hashes(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, str]:
    names = [p for p in fs.find(root) if "/.locks/" not in p]
    return {p[len(root.rstrip("/")) + 1:]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in sorted(names)}


@pytest.mark.slow  # three tiny runs: ~16 s on 2 cores
def test_a_run_into_a_remote_folder_writes_the_local_run_s_bytes(tiny_shards: Path, tmp_path: Path) -> None:
    spec, remote = str(tiny_shards / "*.tar"), _memory_url()
    run_pipeline(tiny_config(spec, remote))
    run_pipeline(tiny_config(spec, tmp_path / "out"))
    memory, memory_root = fsspec.core.url_to_fs(remote)
    local, local_root = fsspec.core.url_to_fs(str(tmp_path / "out"))
    in_memory = _hashes(memory, memory_root)
    assert {"manifest.json", "keep_keys.parquet", "report.html"} <= set(in_memory)
    assert in_memory == _hashes(local, local_root)
    summary = run_pipeline(tiny_config(spec, remote))  # resume: everything is reused
    assert summary["cached_shards"] == summary["shards"] == 4
    assert _hashes(memory, memory_root) == in_memory
