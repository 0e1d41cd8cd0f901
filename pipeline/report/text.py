"""Text on the page: every untrusted value escaped, control characters made visible; the stat card."""

from __future__ import annotations

import html
import re
from typing import Any


# C0/C1 control characters (tab, newline and carriage return aside) are shown as visible \xNN escapes: a caption's
# NUL or ESC byte must never reach the page raw (browsers and terminals that display it misbehave)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def esc(value: Any) -> str:
    text = "" if value is None else str(value)
    return html.escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text))


def stat_card(kind: str, title: str, value: str, sub: str = "") -> str:
    return (f'<div class="card stat {kind}"><div class="k">{esc(title)}</div><div class="v">{esc(value)}</div>'
            f'<div class="s">{esc(sub)}</div></div>')
