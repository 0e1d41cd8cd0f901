"""Deeply nested .json is invalid_json on every runner (issue 16, defect 11): the bound is a fixed depth checked
before parsing, not Python's recursion limit, which depends on how deep the calling thread's stack already is."""

from __future__ import annotations

import threading

import pytest

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import decode_sample
from bicro_clean.pipeline.shards import MAX_JSON_DEPTH, RawSample, ReadIssue, parse_meta


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def test_the_bound_is_exact() -> None:
    assert parse_meta(_nested(MAX_JSON_DEPTH))["a"]
    with pytest.raises(ValueError, match="nested 65 levels"):
        parse_meta(_nested(MAX_JSON_DEPTH + 1))


def test_brackets_inside_strings_do_not_count() -> None:
    text = b'{"caption": "' + b"[{" * 500 + b'", "url": "http://x/]}"}'
    assert parse_meta(text)["url"] == "http://x/]}"
    assert parse_meta(b'{"q": "a \\" [[[ ' + b"{" * 200 + b'"}')["q"].startswith('a " [[[')


def _verdict(stack_depth: int, results: list) -> None:
    if stack_depth:
        _verdict(stack_depth - 1, results)
        return
    sample = RawSample("s.tar", "k", {"txt": b"a cat", "json": _nested(960), "png": b""},
                       {"txt": "k.txt", "json": "k.json", "png": "k.png"})
    result = decode_sample(sample, ReaderConfig())
    results.append(result.reason if isinstance(result, ReadIssue) else "ok")


@pytest.mark.parametrize("stack_depth", [0, 500])
def test_the_verdict_does_not_depend_on_the_thread_or_its_stack(stack_depth: int) -> None:
    here: list = []
    _verdict(stack_depth, here)
    there: list = []
    thread = threading.Thread(target=_verdict, args=(stack_depth, there))
    thread.start()
    thread.join()
    assert here == there == ["invalid_json"]
