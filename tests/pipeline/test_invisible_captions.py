"""Captions with nothing a reader can see are `empty_caption` (issue 16, defect 9), and control characters of a
kept caption never reach report.html raw."""

from __future__ import annotations

import pytest

from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import _decode_caption
from bicro_clean.pipeline.report.page import esc
from bicro_clean.pipeline.shards import RawSample, ReadIssue


def _caption(data: bytes) -> str | ReadIssue:
    return _decode_caption(RawSample("s.tar", "k", {"txt": data}, {"txt": "k.txt"}), ReaderConfig())


@pytest.mark.parametrize("text", [
    "\x00\x00\x00",                  # NUL bytes
    "\u200b\u200c\u200d\u00ad",      # zero-width characters and a soft hyphen
    "\ufeff\u200b",                  # a BOM and a zero-width space
    "\u0301\u0308\u0327",            # combining marks only
    "\x1b\x07\x7f",                  # ESC, BEL, DEL
])
def test_invisible_captions_are_empty(text: str) -> None:
    result = _caption(text.encode("utf-8"))
    assert isinstance(result, ReadIssue) and result.reason == "empty_caption", result


@pytest.mark.parametrize("text", ["a dog", "\u00e9t\u00e9", "\u72ac", "42", "!", "\u2764", "e\u0301"])
def test_visible_captions_are_kept(text: str) -> None:
    assert _caption(text.encode("utf-8")) == text


def test_control_characters_are_escaped_visibly_in_the_page() -> None:
    shown = esc("a\x00b\x1b[31mc\x7fd\te")
    assert "\x00" not in shown and "\x1b" not in shown and "\x7f" not in shown
    assert shown == "a\\x00b\\x1b[31mc\\x7fd\te"
    assert esc("<b>&") == "&lt;b&gt;&amp;"
