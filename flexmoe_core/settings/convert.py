"""Give configuration values their declared Python types (no range or choice checks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def float_or_none(value: Any) -> float | None:
    """Return ``value`` as a float, keeping null."""
    return None if value is None else float(value)


def int_or_none(value: Any) -> int | None:
    """Return ``value`` as an int, keeping null."""
    return None if value is None else int(value)


def str_or_none(value: Any) -> str | None:
    """Return ``value`` as a string, keeping null."""
    return None if value is None else str(value)


def frozen(value: Any) -> Any:
    """Return ``value`` with lists as tuples and mappings as sorted pairs (hashable)."""
    if isinstance(value, Mapping):
        return tuple((str(k), frozen(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(frozen(v) for v in value)
    return value


def section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """Return the mapping under ``key`` (a missing or null section reads as empty)."""
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}
