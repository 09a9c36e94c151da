"""Checks on everything a caller hands in, before anything is written."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, time
from typing import Any

from .errors import InvalidInput
from .types import ROLES

MAX_KEY_CHARS = 512


def check_text(text: object, what: str, max_chars: int) -> str:
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInput(f"{what} is empty")
    if len(text) > max_chars:
        raise InvalidInput(f"{what} is {len(text)} characters; the limit is {max_chars} (setting max_text_chars)")
    if "\x00" in text:
        raise InvalidInput(f"{what} contains a NUL byte (\\x00), which Postgres cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"{what} is not valid Unicode (lone surrogate at position {e.start})") from None
    return text


# Deeper JSON than this is refused: Python's json and Postgres' jsonb both recurse on nesting,
# and no metadata a person writes is nested a hundred levels.
MAX_JSON_DEPTH = 100
# Integers beyond this many bits are refused: json turns ints into decimal text and Python caps
# that conversion (4300 digits), and most JSON readers lose such numbers anyway.
MAX_JSON_INT_BITS = 1024
MAX_FILTER_BYTES = 1 << 20
# Item ids are Postgres bigints.
MAX_ID = 2**63 - 1


def _plain_json(value: Any, path: str, depth: int = 0) -> Any:
    """A plain copy of ``value`` (dict, list, str, int, float, bool, None), or InvalidInput naming
    the first part that JSON cannot hold. Mappings and tuples of any kind become dicts and lists,
    so what is stored is exactly what was checked."""
    if depth > MAX_JSON_DEPTH:
        raise InvalidInput(f"{path} is nested more than {MAX_JSON_DEPTH} levels deep")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidInput(f"{path} contains a NUL byte")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(f"{path} is not valid Unicode (lone surrogate)") from None
        return str(value)
    if isinstance(value, int):
        if value.bit_length() > MAX_JSON_INT_BITS:
            raise InvalidInput(f"{path} is an integer of {value.bit_length()} bits; "
                               f"the limit is {MAX_JSON_INT_BITS} (store it as a string)")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{path} is {value}, which JSON cannot hold")
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidInput(f"{path} has a non-string key {k!r}; JSON keys are strings")
            out[_plain_json(k, f"{path} key", depth + 1)] = _plain_json(v, f"{path}[{k!r}]", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_plain_json(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise InvalidInput(f"{path} is a {type(value).__name__}, which is not JSON (use str, number, bool, None, list, dict)")


def check_metadata(metadata: object, what: str, max_bytes: int) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidInput(f"{what} must be a dict, got {type(metadata).__name__}")
    plain = _plain_json(metadata, what)
    size = len(json.dumps(plain, ensure_ascii=False).encode())
    if size > max_bytes:
        raise InvalidInput(f"{what} is {size} bytes as JSON; the limit is {max_bytes} (setting max_metadata_bytes)")
    return plain


def check_filters(filters: object) -> dict[str, Any] | None:
    """Metadata filters: a dict that an item's metadata must contain (JSON containment)."""
    if filters is None:
        return None
    if not isinstance(filters, Mapping):
        raise InvalidInput(f"filters must be a dict of metadata key -> value, got {type(filters).__name__}")
    if not filters:
        return None
    plain = _plain_json(filters, "filters")
    size = len(json.dumps(plain, ensure_ascii=False).encode())
    if size > MAX_FILTER_BYTES:
        raise InvalidInput(f"filters are {size} bytes as JSON; the limit is {MAX_FILTER_BYTES}")
    return plain


def check_ids(item_ids: object) -> list[int]:
    if isinstance(item_ids, str | bytes) or not isinstance(item_ids, Iterable):
        raise InvalidInput(f"item_ids must be a list of ints, got {type(item_ids).__name__}")
    ids = list(item_ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i <= 0:
            raise InvalidInput(f"item_ids must hold positive ints, got {i!r}")
        if i > MAX_ID:
            raise InvalidInput(f"item id {i} is beyond the largest item id ({MAX_ID})")
    return sorted(set(int(i) for i in ids))


def check_keys(keys: object, what: str = "keys") -> list[str]:
    """Caller keys (:meth:`Memory.put`): a list of non-empty strings of at most 512 characters."""
    if isinstance(keys, str | bytes) or not isinstance(keys, Iterable):
        raise InvalidInput(f"{what} must be a list of strings, got {type(keys).__name__}")
    return [check_text(k, f"{what}[{n}]", MAX_KEY_CHARS) for n, k in enumerate(keys)]


def check_count(value: object, what: str, minimum: int = 0) -> int:
    """A row count or offset: an int from ``minimum`` up to the largest bigint."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_ID:
        raise InvalidInput(f"{what} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_messages(messages: object, max_chars: int) -> list[tuple[str, str]]:
    """Accept dicts ``{"role", "content"}``, ``(role, content)`` pairs or objects with those attributes."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Iterable):
        raise InvalidInput("messages must be a list of {'role': ..., 'content': ...}")
    out = []
    for n, m in enumerate(messages):
        if isinstance(m, Mapping):
            unknown = set(m) - {"role", "content", "name"}
            if unknown:
                raise InvalidInput(f"messages[{n}] has unknown field(s) {sorted(unknown)}")
            role, content = m.get("role"), m.get("content")
        elif isinstance(m, tuple | list) and len(m) == 2:
            role, content = m
        elif hasattr(m, "role") and hasattr(m, "content"):
            role, content = m.role, m.content
        else:
            raise InvalidInput(f"messages[{n}] is a {type(m).__name__}; expected a dict with role and content")
        if role not in ROLES:
            raise InvalidInput(f"messages[{n}].role is {role!r}; expected one of {', '.join(ROLES)}")
        out.append((role, check_text(content, f"messages[{n}].content", max_chars)))
    if not out:
        raise InvalidInput("messages is empty")
    return out


def check_time(value: object, what: str) -> datetime | None:
    """A moment: a timezone-aware datetime, a naive one (taken as UTC), a date (its midnight, UTC)
    or an ISO 8601 string of either; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidInput(f"{what} is {value!r}, not an ISO 8601 date or time "
                               "(e.g. '2024-03-15' or '2024-03-15T09:30:00+01:00')") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime.combine(value, time(0), UTC)
    if not isinstance(value, datetime):
        raise InvalidInput(f"{what} must be a datetime, a date or an ISO 8601 string, got {type(value).__name__}")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def check_relevance(value: object) -> float:
    """A relevance floor: a number from -1 to 1 (cosine similarity's range)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not -1 <= value <= 1:
        raise InvalidInput(f"min_relevance must be a number from -1 to 1, got {value!r}")
    return float(value)
