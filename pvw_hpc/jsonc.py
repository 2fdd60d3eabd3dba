"""Read the stock launcher's JSON dialect: JSON plus ``//`` and ``/* */`` comments.

The stock launcher strips comments before ``json.loads``. We do the same with a
small scanner that knows about strings, so ``"ws://host/..."`` is never mistaken
for a comment, and positions in error messages still match the file (comments
are replaced by spaces, newlines kept).
"""

from __future__ import annotations

import json
from typing import Any


def strip_comments(text: str) -> str:
    """Return ``text`` with comments blanked out, keeping every line and column."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
        elif ch == '"':
            in_string = True
            out.append(ch)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append("".join(c if c == "\n" else " " for c in text[i:end]))
            i = end
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def loads(text: str) -> Any:
    """Parse launcher JSON with comments; raises ``json.JSONDecodeError`` with line/column."""
    return json.loads(strip_comments(text))
