"""Reading http(s):// shards so that a connection cut mid-shard loses nothing that arrived.

fsspec's HTTP backend (aiohttp) raises as soon as a cut connection is noticed, dropping bytes it had already
received but not handed out: a shard cut halfway became "shard_corrupt near byte 0; 0 samples read". This reader
streams the response with Python's http.client, which hands out every byte received before it reports the end.
When the stream ends before the promised Content-Length (or the connection fails), it reconnects, resuming at
the first missing byte with a ``Range`` request (a server that ignores Range sends the whole file again and the
bytes already read are skipped), at most `RETRIES` times in a row without progress. A server that keeps cutting
ends the stream with `CutDownload`, an EOFError: the tar reader records shard_truncated and keeps every whole
sample before the cut.
"""

from __future__ import annotations

import http.client
import logging
import re
import time
import urllib.error
import urllib.request
from typing import Any

logger = logging.getLogger(__name__)

RETRIES = 3  # reconnects in a row that bring no new byte before the shard counts as cut
BACKOFF_SECONDS = 0.25  # wait before reconnect k (1, 2, 3...): k times this; a flaky server gets a moment
TIMEOUT_SECONDS = 60  # per socket operation: a server that stops sending counts as a cut after this
_SKIP_PIECE = 1 << 16
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class CutDownload(EOFError):
    """The server stopped sending before the end it promised, also after the reconnects. An EOFError: the tar
    reader classifies it as shard_truncated (pipeline.tar_reader._classify)."""


def is_http(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def _status_error(error: urllib.error.HTTPError, url: str) -> OSError:
    """An HTTP error status as the OSError the reader maps to shard_unreadable (404 -> FileNotFoundError)."""
    message = f"HTTP {error.code} {error.reason} for {url}"
    if error.code in (404, 410):
        return FileNotFoundError(message)
    if error.code in (401, 403):
        return PermissionError(message)
    return OSError(message)


class ResumingHTTPReader:
    """A forward-only binary stream over one http(s) URL (``read(size)``, ``close``), resuming after cuts."""

    def __init__(self, url: str, retries: int = RETRIES, timeout: float = TIMEOUT_SECONDS) -> None:
        self.url, self.retries, self.timeout = url, retries, timeout
        self.offset = 0  # bytes handed out so far
        self.total: int | None = None  # the file's size, when the server said it
        self.reconnects = 0
        self._response = self._open(0)  # errors here (404, refused) are the caller's shard_unreadable

    # ---------------------------------------------------------------- connections

    def _open(self, start: int) -> http.client.HTTPResponse:
        """A response whose next byte is byte `start` of the file."""
        # identity: byte offsets must be the file's; urllib sends no Accept-Encoding, said here for clarity
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={start}-"} if start else {})}
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                              timeout=self.timeout)
        except urllib.error.HTTPError as error:
            raise _status_error(error, self.url) from None
        except http.client.HTTPException as error:  # not an HTTP answer (BadStatusLine): the caller's OSError
            raise OSError(f"{type(error).__name__} from {self.url}") from None
        resumed = self._position(response, start)
        if resumed > start:  # a range other than asked for: the bytes in between would be missing
            response.close()
            raise OSError(f"asked for bytes from {start}, the server sent from {resumed}")
        if resumed < start:  # the server ignored Range: read past what was handed out already
            self._skip(response, start - resumed)
        return response

    def _position(self, response: http.client.HTTPResponse, start: int) -> int:
        """Where `response` starts in the file; records the file's size."""
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if response.status == 206 and match:
            if match.group(2) != "*":
                self.total = int(match.group(2))
            return int(match.group(1))
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit():
            self.total = int(length)
        return 0

    def _skip(self, response: http.client.HTTPResponse, count: int) -> None:
        while count > 0:
            piece = response.read(min(count, _SKIP_PIECE))
            if not piece:
                raise http.client.IncompleteRead(b"", count)  # cut before it got back to where we were
            count -= len(piece)

    def _reconnect(self, cause: BaseException | None) -> None:
        """Reopen at `offset`; CutDownload after `retries` attempts that brought nothing new."""
        self._response.close()
        for attempt in range(1, self.retries + 1):
            time.sleep(BACKOFF_SECONDS * attempt)
            self.reconnects += 1
            self._broken = False
            try:
                self._response = self._open(self.offset)
            except (OSError, http.client.HTTPException) as error:
                cause = error
                continue
            data = self._read_some(1)  # progress, or a cut again
            if data:
                self._pending = data
                logger.info("%s: connection cut at byte %d; resumed (attempt %d)", self.url, self.offset, attempt)
                return
            self._response.close()
        why = f" ({type(cause).__name__})" if cause is not None else ""
        of = f" of {self.total}" if self.total is not None else ""
        raise CutDownload(f"the server stopped sending at byte {self.offset}{of}{why}; "
                          f"{self.retries} reconnects brought no more")

    # ---------------------------------------------------------------- reading

    _pending = b""  # a byte read to test a reconnect, handed out first
    _broken = False  # the current response ended in an error (a cut chunked stream, a reset)

    def _read_some(self, size: int) -> bytes:
        """Up to `size` bytes from the current response; b"" when it ended or broke (whatever arrived first is
        returned: IncompleteRead carries it)."""
        try:
            return self._response.read(size)
        except http.client.IncompleteRead as error:
            self._broken = True
            self._response.close()
            # a chunked body re-raises the inner IncompleteRead with only the earlier chunks: add what it held
            inner = error.__cause__
            tail = inner.partial if isinstance(inner, http.client.IncompleteRead) else b""
            return bytes(error.partial) + bytes(tail)
        except (OSError, http.client.HTTPException):
            self._broken = True
            self._response.close()
            return b""

    def _complete(self) -> bool:
        # without a size (no Content-Length), an end without an error is the end of the file
        return not self._broken and (self.total is None or self.offset >= self.total)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(_SKIP_PIECE), b""))
        if size == 0:
            return b""
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
        else:
            data = self._read_some(size)
            if not data and not self._complete():
                self._reconnect(None)
                return self.read(size)
        self.offset += len(data)
        return data

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> "ResumingHTTPReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
