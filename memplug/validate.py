"""Checks on everything a caller hands in, before anything is written."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InvalidInput
from .types import ROLES


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


def _check_json(value: Any, path: str) -> None:
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidInput(f"{path} contains a NUL byte")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(f"{path} is not valid Unicode (lone surrogate)") from None
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{path} is {value}, which JSON cannot hold")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidInput(f"{path} has a non-string key {k!r}; JSON keys are strings")
            _check_json(k, f"{path} key")
            _check_json(v, f"{path}[{k!r}]")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json(v, f"{path}[{i}]")
        return
    raise InvalidInput(f"{path} is a {type(value).__name__}, which is not JSON (use str, number, bool, None, list, dict)")


def check_metadata(metadata: object, what: str, max_bytes: int) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidInput(f"{what} must be a dict, got {type(metadata).__name__}")
    _check_json(metadata, what)
    size = len(json.dumps(metadata, ensure_ascii=False).encode())
    if size > max_bytes:
        raise InvalidInput(f"{what} is {size} bytes as JSON; the limit is {max_bytes} (setting max_metadata_bytes)")
    return dict(metadata)


def check_filters(filters: object) -> dict[str, Any] | None:
    """Metadata filters: a dict that an item's metadata must contain (JSON containment)."""
    if filters is None:
        return None
    if not isinstance(filters, Mapping):
        raise InvalidInput(f"filters must be a dict of metadata key -> value, got {type(filters).__name__}")
    if not filters:
        return None
    _check_json(filters, "filters")
    return dict(filters)


def check_ids(item_ids: object) -> list[int]:
    if isinstance(item_ids, str | bytes) or not isinstance(item_ids, Iterable):
        raise InvalidInput(f"item_ids must be a list of ints, got {type(item_ids).__name__}")
    ids = list(item_ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i <= 0:
            raise InvalidInput(f"item_ids must hold positive ints, got {i!r}")
    return sorted(set(ids))


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
