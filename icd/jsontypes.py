"""JSON as a type: what ``json.loads`` gives and ``json.dumps`` takes.

Only for content that is genuinely arbitrary JSON (an HTTP body passed through, a config
section logged as it is); records whose keys are known get a dataclass or a TypedDict.
"""

from __future__ import annotations

from typing import TypeAlias

JSONValue: TypeAlias = "None | bool | int | float | str | list[JSONValue] | dict[str, JSONValue]"
JSONObject: TypeAlias = "dict[str, JSONValue]"

__all__ = ["JSONObject", "JSONValue"]
