"""A connection cut mid-shard keeps every byte that arrived (issue 16, item 4): a loopback server promises N bytes
and closes after N/2, with and without Range support. A cut once is resumed (the whole shard is read); a server
that keeps cutting gives shard_truncated with every whole sample before the cut kept."""

from __future__ import annotations

import gzip
import http.server
import random
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from bicro_clean.pipeline import http_read
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.shards import RawSample, ReadIssue
from bicro_clean.pipeline.tar_reader import iter_shard
from conftest import tar_bytes

SAMPLES = 40


@dataclass
class Behaviour:
    """What the server does: serve `files`, honour Range or not, cut the next `cuts` responses at byte `cut_at`
    of the file (never below the response's first byte)."""

    files: dict[str, bytes] = field(default_factory=dict)
    ranges: bool = True
    cuts: int = 0
    cut_at: int = 0
    chunked: bool = False  # no Content-Length: the body in one chunk (HTTP/1.1 chunked encoding)
    requests: list[str] = field(default_factory=list)  # the Range header of each GET ("" without)


class _CutHandler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0: the connection closes after each response, so a short body is a cut, as in the reported case

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        behaviour: Behaviour = self.server.behaviour
        data = behaviour.files.get(self.path)
        asked = self.headers.get("Range", "")
        behaviour.requests.append(asked)
        if data is None:
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-", asked) if behaviour.ranges else None
        start = int(match.group(1)) if match else 0
        if behaviour.chunked:
            self.protocol_version, self.close_connection = "HTTP/1.1", True
        self.send_response(206 if match else 200)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header(*(("Transfer-Encoding", "chunked") if behaviour.chunked else
                           ("Content-Length", str(len(data) - start))))
        self.end_headers()
        end = len(data)
        if behaviour.cuts:
            behaviour.cuts -= 1
            end = max(start, behaviour.cut_at)
        body = data[start:end]
        if behaviour.chunked:  # one chunk of the whole rest, its end marker only when nothing was cut
            body = b"%x\r\n" % (len(data) - start) + body + (b"\r\n0\r\n\r\n" if end == len(data) else b"")
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # quiet test output
        pass


@pytest.fixture
def server(monkeypatch) -> Iterator[tuple[Behaviour, str]]:
    monkeypatch.setattr(http_read, "BACKOFF_SECONDS", 0.0)
    behaviour = Behaviour()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutHandler)
    httpd.behaviour = behaviour
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield behaviour, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _shard() -> bytes:
    """SAMPLES samples of ~16 KiB incompressible "image" bytes each (the reader does not decode them)."""
    rng = random.Random(7)
    members = []
    for i in range(SAMPLES):
        members += [(f"{i:09d}.jpg", rng.randbytes(16_000 + 37 * i)), (f"{i:09d}.txt", f"caption {i}".encode())]
    return tar_bytes(members)


def _read(url: str) -> list[RawSample | ReadIssue]:
    return list(iter_shard(url, ReaderConfig()))


def _samples(items: list) -> list[tuple[str, dict]]:
    return [(item.key, item.members) for item in items if isinstance(item, RawSample)]


def _local(tmp_path: Path, data: bytes) -> list:
    path = tmp_path / "local.tar"
    path.write_bytes(data)
    return _read(str(path))


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_a_cut_once_is_resumed_and_the_whole_shard_read(server, tmp_path: Path, ranges: bool) -> None:
    behaviour, base = server
    data = _shard()
    behaviour.files["/s.tar"], behaviour.ranges, behaviour.cuts, behaviour.cut_at = data, ranges, 1, len(data) // 2
    items = _read(f"{base}/s.tar")
    assert not [item for item in items if isinstance(item, ReadIssue)]
    assert _samples(items) == _samples(_local(tmp_path, data))
    assert len(_samples(items)) == SAMPLES
    assert behaviour.requests[0] == "" and len(behaviour.requests) == 2
    assert behaviour.requests[1] == (f"bytes={len(data) // 2}-")  # resumed at the first missing byte


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_a_server_that_keeps_cutting_gives_shard_truncated_with_the_samples_before_the_cut(
        server, tmp_path: Path, ranges: bool) -> None:
    behaviour, base = server
    data = _shard()
    cut = len(data) // 2
    behaviour.files["/s.tar"], behaviour.ranges, behaviour.cuts, behaviour.cut_at = data, ranges, 1000, cut
    items = _read(f"{base}/s.tar")
    expected = _local(tmp_path, data[:cut])  # what the bytes that arrived hold
    assert _samples(items) == _samples(expected)
    assert len(_samples(items)) >= SAMPLES // 2 - 2  # about half: every whole sample before the cut
    issues = [item for item in items if isinstance(item, ReadIssue)]
    assert [(i.key, i.reason) for i in issues] == [(i.key, i.reason) for i in expected if isinstance(i, ReadIssue)]
    shard_row = issues[-1]
    assert (shard_row.key, shard_row.reason) == ("", "shard_truncated")
    assert f"stopped sending at byte {cut} of {len(data)}" in shard_row.detail
    assert f"{len(_samples(items))} samples read" in shard_row.detail
    assert len(behaviour.requests) == 1 + http_read.RETRIES  # bounded: the first request and the reconnects


def test_a_cut_chunked_response_without_a_length_is_resumed(server, tmp_path: Path) -> None:
    behaviour, base = server
    data = _shard()
    behaviour.files["/s.tar"], behaviour.chunked, behaviour.cuts, behaviour.cut_at = data, True, 1, len(data) // 3
    items = _read(f"{base}/s.tar")
    assert len(_samples(items)) == SAMPLES and not [i for i in items if isinstance(i, ReadIssue)]
    assert behaviour.requests == ["", f"bytes={len(data) // 3}-"]


def test_a_cut_gzip_shard_keeps_the_samples_before_the_cut(server, tmp_path: Path) -> None:
    behaviour, base = server
    data = gzip.compress(_shard(), mtime=0)
    behaviour.files["/s.tar.gz"], behaviour.cuts, behaviour.cut_at = data, 1000, len(data) // 2
    items = _read(f"{base}/s.tar.gz")
    assert SAMPLES // 2 - 3 <= len(_samples(items)) < SAMPLES
    assert (items[-1].key, items[-1].reason) == ("", "shard_truncated")


def test_missing_and_refused_shards_are_unreadable(server) -> None:
    _, base = server
    (missing,) = _read(f"{base}/missing.tar")
    assert (missing.reason, missing.key) == ("shard_unreadable", "")
    assert "404" in missing.detail
    (refused,) = _read("http://127.0.0.1:9/x.tar")  # discard port: nothing listens
    assert refused.reason == "shard_unreadable"


def test_a_server_that_does_not_speak_http_is_unreadable() -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(4096)
            connection.sendall(b"garbage, not a status line\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    (item,) = _read(f"http://127.0.0.1:{listener.getsockname()[1]}/x.tar")
    thread.join(5)
    listener.close()
    assert (item.key, item.reason) == ("", "shard_unreadable")
    assert "BadStatusLine" in item.detail
