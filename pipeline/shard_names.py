"""Shard identity: one spelling per shard (`canonical_url`) and the id every artifact joins on (`shard_id`).

A shard's id depends only on what it is, never on how its path was typed or where the command ran: a relative
path, an absolute one, ``./``, ``file://`` all give the same `shard_id`. It names the shard's files in the output
folder and is the `shard_id` column of annotated/, filtered/, keep_keys.parquet and manifest_shards.parquet; anchor
keys are ``<shard_id>/<key>``. The `shard` columns keep the spec as given, for people.
"""

from __future__ import annotations

import hashlib
import os
import re
from urllib.parse import urlsplit, urlunsplit

import fsspec

_SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def canonical_url(url: str) -> str:
    """One spelling per shard: a local path (or file:// URL) absolute and normalised (symlinks kept: the name the
    user gave, not where it points today); a URL with its scheme lower-cased, and for http(s) the host lower-cased,
    a default port dropped and "." / ".." segments resolved (object-store keys are literal: left as written). pipe:
    commands stay as written."""
    if not url or url.startswith("pipe:"):
        return url
    if "::" in url:  # chained fsspec URL ("simplecache::s3://b/x.tar"): the protocols, then the shard's own URL
        head, _, last = url.rpartition("::")
        return f"{head.lower()}::{canonical_url(last)}"
    protocol, path = fsspec.core.split_protocol(url)
    if protocol is None or protocol.lower() in ("file", "local"):
        return os.path.normpath(os.path.abspath(os.path.expanduser(path)))
    if protocol.lower() not in ("http", "https"):
        return protocol.lower() + url[len(protocol):]
    parts = urlsplit(url)
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    default_port = ":80" if scheme == "http" else ":443"
    netloc = netloc[: -len(default_port)] if netloc.endswith(default_port) else netloc
    return urlunsplit((scheme, netloc, _remove_dot_segments(parts.path), parts.query, parts.fragment))


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path: "/a/./b/../c" -> "/a/c"; repeated slashes are kept."""
    if not path.startswith("/"):
        return path
    out: list[str] = []
    segments = path.split("/")[1:]
    for segment in segments:
        if segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    trailing = [""] if segments[-1] in (".", "..") else []
    return "/" + "/".join(out + trailing)


def shard_id(url: str) -> str:
    """Filesystem-safe, deterministic output stem for a shard, unique per shard: ``{stem}-{sha1(canonical)[:8]}``,
    the same whichever way the path was spelled (relative, absolute, ``./``, ``file://``; see `canonical_url`)."""
    canonical = canonical_url(url)
    base = re.split(r"[/\\]", canonical.rstrip("/\\"))[-1]
    for suffix in _SHARD_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:80] or "shard"
    digest = hashlib.sha1(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{stem}-{digest}"


def shard_ids(urls: list[str | None]) -> list[str | None]:
    """`shard_id` of every row's shard spec: the `shard_id` column of annotated/, filtered/ and keep_keys.parquet,
    the join key every artifact shares (anchor keys are `<shard_id>/<key>`, manifest_shards has it per input).
    A table holds few distinct shards, so each is hashed once."""
    known: dict[str | None, str | None] = {None: None}  # no shard, no id (a table written by other tools)
    return [known[url] if url in known else known.setdefault(url, shard_id(url)) for url in urls]
