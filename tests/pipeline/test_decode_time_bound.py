"""Decoding is bounded in time as well as in pixels (issue 16): a decode that overruns reader.max_decode_seconds
is recorded as decode_timeout, interrupted where a timer can reach it (a process's main thread: the decode
workers) and rejected after the fact elsewhere, so the reason is the same under every runner."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

from bicro_clean.pipeline import decode
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import decode_sample
from bicro_clean.pipeline.shards import REASONS, RawSample, ReadIssue


def _sample() -> RawSample:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 120, 200)).save(buffer, format="PNG")
    return RawSample("s.tar", "k", {"png": buffer.getvalue(), "txt": b"a blue square"},
                     {"png": "k.png", "txt": "k.txt"})


@pytest.fixture
def slow_decode(monkeypatch):
    """A decoder that takes 2 s, the way a file with thousands of progressive scans does."""
    to_rgb = decode._to_rgb

    def slow(image):
        deadline = time.perf_counter() + 2.0
        while time.perf_counter() < deadline:  # busy, like a decoder: a timer must interrupt running code
            pass
        return to_rgb(image)

    monkeypatch.setattr(decode, "_to_rgb", slow)


def test_an_overrunning_decode_is_interrupted_in_the_main_thread(slow_decode):
    start = time.perf_counter()
    result = decode_sample(_sample(), ReaderConfig(max_decode_seconds=0.2))
    assert isinstance(result, ReadIssue) and result.reason == "decode_timeout" and "decode_timeout" in REASONS
    assert "max_decode_seconds=0.2" in result.detail
    assert time.perf_counter() - start < 1.5  # stopped at the bound, not after the 2 s decode


def test_an_overrunning_decode_in_another_thread_gets_the_same_reason(slow_decode):
    results = []
    config = ReaderConfig(max_decode_seconds=0.2)
    worker = threading.Thread(target=lambda: results.append(decode_sample(_sample(), config)))
    worker.start()
    worker.join()
    assert isinstance(results[0], ReadIssue) and results[0].reason == "decode_timeout"


def test_within_the_bound_or_without_one_the_image_decodes(slow_decode):
    assert not isinstance(decode_sample(_sample(), ReaderConfig(max_decode_seconds=0)), ReadIssue)
    assert not isinstance(decode_sample(_sample(), ReaderConfig(max_decode_seconds=10)), ReadIssue)


def test_the_timer_is_disarmed_after_a_decode():
    import signal

    assert not isinstance(decode_sample(_sample(), ReaderConfig(max_decode_seconds=0.2)), ReadIssue)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
