"""Object stores (issue 15, item 9): shards read from and every output written to an S3 API, against a real
S3-compatible server (moto's server mode) on loopback. The CLI runs as a subprocess, as a user would run it, with
the endpoint and fake credentials in its environment (botocore reads AWS_ENDPOINT_URL).

Every output lands in the bucket and matches, file for file (sha256), a run of the same input into a local
folder; a run killed mid-way and rerun, and a rerun after outputs were deleted, finish with the same bytes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import TINY_BICRO, TINY_EMBED, image_bytes, tar_bytes

pytestmark = pytest.mark.slow  # CLI subprocesses against a moto server: ~25 s a run on 2 cores
BIN = Path(sys.executable).parent
BUCKET = "bucket"
SPEC = f"s3://{BUCKET}/shards/{{00000..00003}}.tar"
TMP_PREFIX = ".tmp-"  # pipeline.parquet_io.atomic_output's temp files: a kill may leave some, never final names
EXPECTED = ("annotated/", "filtered/", "shards/", "embeddings/", "scores/", "results/", "checkpoint/",
            "keep_keys.parquet", "keep_uids.npy", "manifest.json", "manifest_shards.parquet", "report.html")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[tuple[object, dict[str, str]]]:
    """(an s3fs filesystem on a fresh loopback moto server with the input shards uploaded, the environment a
    subprocess needs to reach it)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))},
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect")),
           "TMPDIR": str(tmp_path_factory.mktemp("tmp"))}  # where a remote --out keeps its lock files
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    for i, data in enumerate(_input_shards()):
        fs.pipe(f"{BUCKET}/shards/{i:05d}.tar", data)
    yield fs, env
    server.stop()


def _input_shards() -> list[bytes]:
    """4 shards x 6 samples with DataComp-style 32-hex uids (so keep_uids.npy is written), every 4th caption
    about another image (so some samples are dropped)."""
    shards = []
    for s in range(4):
        members = []
        for i in range(6):
            n, key = s * 6 + i, f"{s:05d}{i:04d}"
            meta = {"url": f"http://example.invalid/{n}.png", "uid": hashlib.md5(key.encode()).hexdigest()}
            caption = f"colour {n + 5}" if n % 4 == 0 else f"a picture number {n}"
            image = image_bytes("PNG", color=(37 * n % 256, (255 - 29 * n) % 256, 61 * n % 256))
            members += [(f"{key}.png", image), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
        shards.append(tar_bytes(members))
    return shards


def _config(tmp: Path) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump({"embed": {**TINY_EMBED, "num_workers": 1}, "bicro": TINY_BICRO,
                                    "out": {"maxcount": 4}}))
    return path


def _command(config: Path, out: str) -> list[str]:
    return [str(BIN / "bicro-clean"), "run", "-c", str(config), "--input", SPEC, "--out", out, "--runner", "none"]


def _run(config: Path, out: str, env: dict[str, str]) -> None:
    done = subprocess.run(_command(config, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def _bucket_hashes(fs, prefix: str) -> dict[str, str]:
    fs.invalidate_cache()  # other processes wrote there
    names = [n for n in fs.find(f"{BUCKET}/{prefix}") if not n.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]
    return {n[len(f"{BUCKET}/{prefix}/"):]: hashlib.sha256(fs.cat_file(n)).hexdigest() for n in sorted(names)}


def _local_hashes(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts]
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


@pytest.fixture(scope="module")
def reference(s3, tmp_path_factory) -> dict[str, str]:
    """The sha256 of every file of an uninterrupted run of the S3 shards into a local folder."""
    _, env = s3
    tmp = tmp_path_factory.mktemp("local")
    _run(_config(tmp), str(tmp / "out"), env)
    return _local_hashes(tmp / "out")


def test_every_output_lands_in_the_bucket_and_matches_a_local_run(s3, reference, tmp_path: Path) -> None:
    fs, env = s3
    _run(_config(tmp_path), f"s3://{BUCKET}/out", env)
    in_bucket = _bucket_hashes(fs, "out")
    for name in EXPECTED:
        assert any(path.startswith(name) for path in in_bucket), f"{name} missing from the bucket"
    assert in_bucket == reference
    assert not [n for n in fs.find(f"{BUCKET}/out") if TMP_PREFIX in n]  # nothing half-written left behind
    with fs.open(f"{BUCKET}/out/manifest_shards.parquet", "rb") as fh:  # the manifest's per-shard part
        inputs = pq.read_table(fh, columns=["url", "fingerprint"]).to_pylist()
    assert [i["url"] for i in inputs] == [f"s3://{BUCKET}/shards/{i:05d}.tar" for i in range(4)]
    assert all(i["fingerprint"] for i in inputs)  # from the objects' ETags


def _wait_and_kill(proc: subprocess.Popen, fs, folder: str, timeout: float = 120) -> bool:
    """SIGKILL `proc` once an object exists under `folder`; False when the run ended first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        fs.invalidate_cache()
        if fs.exists(folder) and [n for n in fs.find(folder) if TMP_PREFIX not in n]:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.wait(timeout=300)
    return False


def test_killed_and_damaged_s3_runs_resume_to_identical_outputs(s3, reference, tmp_path: Path) -> None:
    fs, env = s3
    config, out = _config(tmp_path), f"s3://{BUCKET}/resume"
    killed = []
    for stage_folder in ("embeddings", "annotated"):  # a kill in the embed stage, then one in the write stage
        proc = subprocess.Popen(_command(config, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        killed.append(_wait_and_kill(proc, fs, f"{BUCKET}/resume/{stage_folder}"))
    assert killed[0], "the first run finished before it could be killed"
    fs.invalidate_cache()
    assert not (killed[1] and fs.exists(f"{BUCKET}/resume/manifest.json"))  # killed before it finished
    _run(config, out, env)
    assert _bucket_hashes(fs, "resume") == reference
    # outputs of every stage deleted: the rerun redoes just those, to the same bytes
    for name in ("embeddings/00001", "scores/00002", "annotated/00003", "shards/00000", "checkpoint/",
                 "manifest.json", "keep_uids.npy"):
        for path in [p for p in fs.find(f"{BUCKET}/resume") if p[len(f"{BUCKET}/resume/"):].startswith(name)]:
            fs.rm(path)
    _run(config, out, env)
    assert _bucket_hashes(fs, "resume") == reference


def test_s3_globs_list_the_bucket_and_a_missing_match_is_one_line(s3) -> None:
    import s3fs

    from bicro_clean.pipeline.shards import MissingInputError, expand_shard_spec

    _, env = s3
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            if name.startswith("AWS_"):
                patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made before would keep its endpoint
        try:
            assert list(expand_shard_spec(f"s3://{BUCKET}/shards/*.tar")) == [
                f"s3://{BUCKET}/shards/{i:05d}.tar" for i in range(4)]
            with pytest.raises(MissingInputError, match="no shard matches"):
                list(expand_shard_spec(f"s3://{BUCKET}/none/*.tar"))
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
