"""The generic rules every config check is built from (``config.py`` for the run, ``data/config.py`` for data).

A rule takes a value and the section it sits in (for checks across keys) and returns None for a good value,
else what is allowed: ``"must be a positive integer"``. The caller names the key: ``<key>=<value>: <rule's text>``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

Rule = Callable[[Any, Mapping[str, Any]], Optional[str]]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float, finite, not a bool."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def positive_int(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if is_int(value) and value >= 1 else "must be a positive integer"


def non_negative_int(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if is_int(value) and value >= 0 else "must be an integer >= 0"


def positive_number(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if is_number(value) and value > 0 else "must be a number > 0"


def non_negative_number(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if is_number(value) and value >= 0 else "must be a number >= 0"


def number_in(low: float, high: float, *, high_open: bool = False) -> Rule:
    def check(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
        inside = is_number(value) and low <= value and (value < high if high_open else value <= high)
        return None if inside else f"must be a number in [{low}, {high}{')' if high_open else ']'}"

    return check


def boolean(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if isinstance(value, bool) else "must be true or false"


def auto_or_boolean(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if value == "auto" or isinstance(value, bool) else "must be auto, true or false"


def share(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    """A share of something whole: a number in (0, 1]."""
    return None if is_number(value) and 0 < value <= 1 else "must be a number in (0, 1]"


def text(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def texts(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    return None if ok else "must be a list of strings"


def one_of(*allowed: str) -> Rule:
    def check(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"

    return check


def optional(rule: Rule) -> Rule:
    """``rule``, or null."""

    def check(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
        problem = None if value is None else rule(value, cfg)
        return None if problem is None else f"{problem}, or null"

    return check


def format_value(value: Any) -> str:
    """A value as the user would type it in a Hydra override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(format_value, value)) + "]"
    return str(value)
