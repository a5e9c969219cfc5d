"""One rule for turning an exception into the one-line message ICD shows or records."""

from __future__ import annotations

import re

MAX_CHARS = 240
# "<_io.BytesIO object at 0x7f...>": differs per process, so a recorded reason would too.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def one_line(error: BaseException, limit: int = MAX_CHARS) -> str:
    """The one-line form of ``error``'s message.

    The rule: the first non-blank line of ``str(error)``, with whitespace runs collapsed to
    one space and object reprs carrying a memory address (``<... at 0x...>``) removed, so
    the same failure reads the same on every run; the exception's type name when nothing
    is left; cut to at most ``limit`` characters, ending in ``...`` when cut.
    """
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = " ".join(_OBJECT_REPR.sub("", lines[0]).split()) if lines else ""
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
