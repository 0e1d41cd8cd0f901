"""One configuration at a time per output folder.

Two runs with the same configuration on one `--out` are safe: every stage writes atomically and both produce the
same bytes, so they may overlap (tested). Two runs with different configurations would overwrite each other's
files, the last writer winning file by file. Each run therefore holds a shared `flock` on a lock file named after
its configuration hash (`OUT/.locks/<hash>.lock`) and refuses to start while a lock of another hash is held.
The kernel drops a lock when its process dies, so a killed run never blocks the next one. Which configuration may
write a folder at all, once the runs before it have ended, is pipeline/owner.py's rule (checked under this lock).

Object stores have no advisory locks. For a remote `--out` (``s3://bucket/out``) the lock files live in a local
folder keyed by the URL, `<temp dir>/bicro-clean-locks/<sha256(url)[:16]>/`: runs on this machine are guarded
as for a local folder; runs on other machines writing to the same URL are not (logged once per run).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
from typing import Iterator

import fsspec

from bicro_clean.pipeline.parquet_io import is_local_fs

logger = logging.getLogger(__name__)
LOCK_DIR = ".locks"
REMOTE_LOCKS = "bicro-clean-locks"  # under the temp dir: the lock folders of remote outputs


class OutputBusyError(RuntimeError):
    """Another run with a different configuration is writing to the same output folder."""


class OutputError(ValueError):
    """The output location cannot be used as a folder (an existing file, not writable). Its message is one line:
    the CLI prints it before any work, and a deployment run fails with it as its state message."""


def remote_output_problem(output: str) -> str | None:
    """Why a remote --out (s3://...) cannot be written, found by writing and removing one small probe object: two
    requests, instead of a botocore traceback after the embed stage."""
    probe = output.rstrip("/") + f"/.bicro-clean-probe-{os.getpid()}"
    try:
        fs, path = fsspec.core.url_to_fs(probe)
        with fs.open(path, "wb") as fh:
            fh.write(b"probe")
        fs.rm(path)
    except Exception as error:  # any failure here (network, credentials, bucket) makes the output unusable
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"--out {output!r} cannot be written: {type(error).__name__}: {first_line}"
    return None


def output_problem(output: str) -> str | None:
    """Why the output folder cannot be used (an existing file, not writable, a remote store that refuses a
    write), or None."""
    protocol, path = fsspec.core.split_protocol(output)
    if protocol not in (None, "file", "local"):
        return remote_output_problem(output)
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--out {output!r} is an existing file, not a folder"
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--out {output!r} cannot be created: {parent!r} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {output!r} is not writable" if parent == path else \
            f"--out {output!r} cannot be created: {parent!r} is not writable"
    return None


def _held_by_someone(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # removed meanwhile: not held
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


def lock_folder(output: str) -> str:
    """Where the lock files of `output` live: inside a local folder; for a remote URL, in a local folder keyed
    by the URL (a bucket cannot hold a flock)."""
    fs, root = fsspec.core.url_to_fs(output)
    if is_local_fs(fs):
        return os.path.join(root, LOCK_DIR)
    url = fs.unstrip_protocol(root.rstrip("/"))  # one spelling: "s3://b/out/" and "s3://b/out" share a lock
    logger.info("output %s is remote: runs with other configs are detected on this machine only", output)
    return os.path.join(tempfile.gettempdir(), REMOTE_LOCKS, hashlib.sha256(url.encode()).hexdigest()[:16])


@contextlib.contextmanager
def output_lock(output: str, config_hash: str) -> Iterator[None]:
    """Hold this configuration's lock on `output` for the block; OutputBusyError when another configuration's
    run holds one."""
    problem = output_problem(output)
    if problem:  # checked here too: a deployment run has no CLI check before it (else a NotADirectoryError)
        raise OutputError(problem)
    folder = lock_folder(output)
    os.makedirs(folder, exist_ok=True)
    mine = os.path.join(folder, f"{config_hash}.lock")
    fd = os.open(mine, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        for name in sorted(os.listdir(folder)):
            other = os.path.join(folder, name)
            if other != mine and name.endswith(".lock") and _held_by_someone(other):
                raise OutputBusyError(f"another bicro-clean run with a different configuration ({name[:-5]}) is "
                                      f"writing to {output}; wait for it or use another --out")
        yield
    finally:
        os.close(fd)
