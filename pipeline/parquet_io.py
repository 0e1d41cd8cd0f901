"""Small IO helpers shared by every stage: atomic writes, fingerprints, Parquet metadata."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from bicro_clean.pipeline import content_id

logger = logging.getLogger(__name__)
METADATA_KEY = b"bicro_clean"


def package_version() -> str:
    try:
        return metadata.version("bicro-clean")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and fsspec URLs alike."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


@contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary sibling path; rename it to `path` only if the block finishes.

    A reader (or a resumed run) never sees a partial file under the final name: a crash leaves only a
    `.tmp-<uuid>-<name>.partial` file, which nothing reads and the next run does not reuse (it writes its own).
    The `.partial` suffix keeps such leftovers out of `*.parquet` / `*.tar` globs: polars and fsspec globs,
    unlike the shell's, also match dot files, so `pl.scan_parquet("out/annotated/*.parquet")` would choke on one.
    An object store has no rename: `mv` there is a server-side copy then a delete, and an object appears whole
    or not at all, so the guarantee holds there too. (Writing straight to the final key would not do: fsspec
    commits a remote file on close even when the block raised, publishing a partial one.)
    """
    fs, _, (final,) = fsspec.get_fs_token_paths(path)
    parent = final.rsplit("/", 1)[0] if "/" in final else "."
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[-1]}.partial"
    moved = False
    try:
        # callers open the name with fsspec.open: a remote one needs its protocol back ("bucket/x" is local)
        yield tmp if is_local_fs(fs) else fs.unstrip_protocol(tmp)
        fs.mv(tmp, final)
        moved = True
    finally:
        if not moved and fs.exists(tmp):  # after a move there is nothing to check: saves requests on a store
            fs.rm(tmp)


def write_parquet_atomic(table: pa.Table, path: str, meta: dict[str, Any], row_group_rows: int | None = None) -> None:
    """`table` with bicro-clean `meta` at `path`, all at once or not at all; `row_group_rows` caps a row group
    (None: Parquet's default, up to 1M rows)."""
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[METADATA_KEY] = json.dumps(meta, sort_keys=True).encode()
    table = table.replace_schema_metadata(schema_meta)
    with atomic_output(path) as tmp:
        with fsspec.open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd", row_group_size=row_group_rows)


def read_columns(path: str, columns: list[str] | None) -> pa.Table:
    """Some columns (None: all) of a Parquet file, local or fsspec URL."""
    with fsspec.open(path, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def read_stage_metadata(path: str) -> dict[str, Any] | None:
    """The bicro-clean metadata of a Parquet file, or None when it is missing or unreadable."""
    try:
        with fsspec.open(path, "rb") as fh:
            schema_meta = pq.read_schema(fh).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    raw = schema_meta.get(METADATA_KEY)
    return json.loads(raw) if raw else None


# What a backend's info says about a file's version: local size + mtime; object stores' ETag / MD5 / LastModified;
# an HTTP server's Last-Modified, ETag, Content-MD5 and Digest headers (fsspec's HTTP info keeps their names).
_STAMP_FIELDS = ("size", "mtime", "ETag", "etag", "md5Hash", "LastModified", "Last-Modified", "Content-MD5", "Digest")


def input_fingerprint(url: str) -> str:
    """Cheap identity of an input file (size + modification time or etag) without reading it."""
    fs, _, (path,) = fsspec.get_fs_token_paths(url)
    info = fs.info(path)
    stamp = {k: str(info.get(k)) for k in _STAMP_FIELDS if k in info}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def shard_fingerprint(url: str) -> str:
    """The up-front identity of an input shard (pipeline.content_id): input_fingerprint, plus for a local file its
    member headers and outer data blocks read by seeking. For an input without a cheap identity (a pipe: command,
    an HTTP URL that answers 404, a path that is gone) a stand-in derived from the spec: reading it then records
    shard_unreadable (or the command's output) instead of the whole run failing on its cache key."""
    try:
        stamp = input_fingerprint(url)
        local = content_id.local_file(url)
        return stamp if local is None else digest(stamp, content_id.local_identity(local))
    except Exception as error:  # any backend's error: the reader reports the real problem in its row
        logger.debug("no fingerprint for %s (%s): keyed by its spec", url, type(error).__name__)
        return "spec-" + digest(url)


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with fsspec.open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
