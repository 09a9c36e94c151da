"""Export a scope's memory as JSON lines, and import it back (``memplug export`` / ``memplug import``).

One line per item, oldest first::

    {"format": "memplug-item/1", "scope": "alice/helper/s1", "id": 12, "text": "...", "role": null,
     "key": null, "metadata": {...}, "created_at": "2025-05-01T10:00:00+00:00", "occurred_at": null,
     "usage": {"reads": 3, "used": 1, "last_read_at": "...", "heat": 2.7}, "level": 2}

Only the source of truth travels: text, metadata, role, key, scope, creation
time, the time its event happened (``occurred_at``, optional) and usage. Derived artifacts (KV blobs, adapters) do not: imported items
start at the lowest level a write places them (text in ``pgvector``, turns in
``context``), and consolidation rebuilds the higher tiers from their usage.
``level`` and ``id`` are recorded for people and ignored on import.

Import checks every line before it writes anything and writes in one
transaction: a bad line is an :class:`InvalidInput` naming its line number, and
then nothing is imported. Importing the same file again changes nothing: an
item already in its scope (the same text, the same key and text, or for a turn
the same role, text and time) is left as it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import InvalidInput, MemplugError
from .memory import Memory
from .rows import ITEM_COLUMNS, item_from_row
from .scoping import subtree_sql
from .types import ROLES, Scope
from .validate import MAX_KEY_CHARS, check_metadata, check_text

FORMAT = "memplug-item/1"
FIELDS = {"format", "scope", "id", "text", "role", "key", "metadata", "created_at", "occurred_at", "usage", "level"}
USAGE_FIELDS = {"reads", "used", "last_read_at", "heat"}
MAX_COUNT = 2**31 - 1


@dataclass(frozen=True)
class Imported:
    """What an import did: items ``written``, and items ``existing`` already (left as they were)."""

    written: int
    existing: int


@dataclass(frozen=True)
class _Record:
    line: int
    scope: Scope
    text: str
    role: str | None
    key: str | None
    metadata: dict[str, Any]
    created_at: datetime | None
    usage: dict[str, Any] | None
    occurred_at: datetime | None = None


def export(memory: Memory, scope: Scope | str) -> Iterator[str]:
    """The items of ``scope`` and of every scope under it, one JSON line each (no newline), oldest first.

    Reads one consistent snapshot, streamed from the database.
    """
    scope = Scope.of(scope)
    where, params = subtree_sql(scope, "i")
    with memory.store.scoped(scope) as db, db.cursor(name="memplug_export") as cur:
        cur.itersize = 500
        cur.execute(
            f"""
            SELECT {ITEM_COLUMNS}, coalesce(u.reads, 0), coalesce(u.used, 0), u.last_read_at,
                   coalesce(u.heat * exp(-ln(2) * extract(epoch FROM now() - u.heat_at) / %(hl)s), 0),
                   (SELECT max(p.level) FROM placements p WHERE p.item_id = i.id)
            FROM items i LEFT JOIN usage u ON u.item_id = i.id
            WHERE {where} ORDER BY i.id
            """, {**params, "hl": memory.half_life_s})
        for row in cur:
            item = item_from_row(row)
            reads, used, last_read_at, heat, level = row[-5:]
            yield json.dumps({
                "format": FORMAT, "scope": str(item.scope), "id": item.id, "text": item.text, "role": item.role,
                "key": item.key, "metadata": dict(item.metadata),
                "created_at": item.created_at.isoformat() if item.created_at else None,
                "occurred_at": item.occurred_at.isoformat() if item.occurred_at else None,
                "usage": {"reads": reads, "used": used,
                          "last_read_at": last_read_at.isoformat() if last_read_at else None,
                          "heat": round(float(heat), 6)},
                "level": level,
            }, ensure_ascii=False)


def import_(memory: Memory, scope: Scope | str | None, lines: Iterable[str | bytes]) -> Imported:
    """Restore items from JSON lines made by :func:`export`; return what was written.

    With ``scope``, items go there instead of the scope on their line: its user
    replaces theirs, and its agent and session replace theirs where it names them
    (``bob`` takes ``alice/helper/s1`` to ``bob/helper/s1``). Every line is checked
    before anything is written; the import is one transaction.
    """
    target = Scope.of(scope) if scope is not None else None
    if isinstance(lines, str | bytes):
        lines = lines.splitlines()
    records: list[_Record] = []
    for n, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(f"line {n}: not UTF-8 (byte {e.start})") from None
        if not isinstance(line, str):
            raise InvalidInput(f"line {n}: expected a str, got {type(line).__name__}")
        if line.strip():
            records.append(_parse(memory, n, line, target))
    _check_keys_agree(records)
    written = existing = 0
    # Lines of many users (no target scope) are admin work across users: the unscoped path.
    with memory.store.scoped(target) if target is not None else memory.store.transaction() as db:
        now = db.execute("SELECT now()").fetchone()[0]
        for group_scope, group in _by_scope(records).items():
            w, e = _write_group(memory, db, group_scope, group, now)
            written += w
            existing += e
    return Imported(written, existing)


# -- checking lines -------------------------------------------------------------------------


def _parse(memory: Memory, n: int, line: str, target: Scope | None) -> _Record:
    try:
        return _record(memory, n, line, target)
    except MemplugError as e:
        raise type(e)(f"line {n}: {e}") from None


def _record(memory: Memory, n: int, line: str, target: Scope | None) -> _Record:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"not JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InvalidInput("not JSON that memplug reads (nested too deeply)") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise InvalidInput(f"format is {data.get('format')!r}, expected {FORMAT!r} (a line of `memplug export`)")
    unknown = set(data) - FIELDS
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)}")
    if not isinstance(data.get("scope"), str):
        raise InvalidInput("scope must be a string such as 'alice' or 'alice/helper/s1'")
    scope = _rebase(Scope.parse(data["scope"]), target)
    text = check_text(data.get("text"), "text", memory.max_text_chars)
    role = data.get("role")
    if role is not None and role not in ROLES:
        raise InvalidInput(f"role is {role!r}; expected null or one of {', '.join(ROLES)}")
    if role is not None and scope.session_id is None:
        raise InvalidInput(f"a turn (role {role!r}) needs a scope with a session, got {scope}")
    key = data.get("key")
    if key is not None:
        key = check_text(key, "key", MAX_KEY_CHARS)
        if role is not None:
            raise InvalidInput("an item has a key or a role, not both")
    metadata = check_metadata(data.get("metadata"), "metadata", memory.max_metadata_bytes)
    created_at = _time(data.get("created_at"), "created_at")
    usage = data.get("usage")
    if usage is not None:
        if not isinstance(usage, dict) or set(usage) - USAGE_FIELDS:
            raise InvalidInput(f"usage must be an object with {', '.join(sorted(USAGE_FIELDS))}")
        for name in ("reads", "used"):
            v = usage.get(name, 0)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
                raise InvalidInput(f"usage.{name} must be an int from 0 to {MAX_COUNT}, got {v!r}")
        heat = usage.get("heat", 0.0)
        if isinstance(heat, bool) or not isinstance(heat, int | float) or not math.isfinite(heat) or heat < 0:
            raise InvalidInput(f"usage.heat must be a finite number >= 0, got {heat!r}")
        usage = {"reads": usage.get("reads", 0), "used": usage.get("used", 0), "heat": float(heat),
                 "last_read_at": _time(usage.get("last_read_at"), "usage.last_read_at")}
    for name in ("id", "level"):
        v = data.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise InvalidInput(f"{name} must be an int or null, got {v!r}")
    return _Record(n, scope, text, role, key, metadata, created_at, usage, _time(data.get("occurred_at"), "occurred_at"))


def _rebase(scope: Scope, target: Scope | None) -> Scope:
    if target is None:
        return scope
    return Scope(target.user_id, target.agent_id or scope.agent_id, target.session_id or scope.session_id)


def _time(value: object, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be an ISO 8601 time or null, got {type(value).__name__}")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{what} {value[:40]!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise InvalidInput(f"{what} {value!r} has no time zone (write it as ...+00:00)")
    return t


def _check_keys_agree(records: list[_Record]) -> None:
    seen: dict[tuple[Scope, str], _Record] = {}
    for r in records:
        if r.key is None:
            continue
        first = seen.setdefault((r.scope, r.key), r)
        if first.text != r.text:
            raise InvalidInput(f"line {r.line}: key {r.key!r} in {r.scope} was given another text on line "
                               f"{first.line}")


def _by_scope(records: list[_Record]) -> dict[Scope, list[_Record]]:
    groups: dict[Scope, list[_Record]] = {}
    for r in records:
        groups.setdefault(r.scope, []).append(r)
    return groups


# -- writing ----------------------------------------------------------------------------------


def _write_group(memory: Memory, db: Any, scope: Scope, records: list[_Record], now: datetime) -> tuple[int, int]:
    """Write one scope's records in the caller's transaction; return (written, already there)."""
    u, a, s = scope.key
    keys = [r.key for r in records if r.key is not None]
    if keys:
        held = dict(db.execute("SELECT key, text FROM items WHERE user_id = %s AND agent_id = %s "
                               "AND session_id = %s AND key = ANY(%s)", (u, a, s, keys)).fetchall())
        for r in records:
            if r.key in held and held[r.key] != r.text:
                raise InvalidInput(f"line {r.line}: key {r.key!r} in {scope} already holds another text; "
                                   "forget_keys it first to replace it")
    # Turns are events (their content hash is unique), so a turn already imported is found by
    # its role, text and time.
    turns = [r for r in records if r.role is not None]
    present: set[tuple[str, str, datetime]] = set()
    if turns:
        present = {(r[0], r[1], r[2]) for r in db.execute(
            "SELECT role, text, created_at FROM items WHERE user_id = %s AND agent_id = %s AND session_id = %s "
            "AND role IS NOT NULL AND text = ANY(%s)", (u, a, s, [r.text for r in turns])).fetchall()}
    todo = [r for r in records if r.role is None or (r.role, r.text, r.created_at) not in present]
    if not todo:
        return 0, len(records)
    rows = [(r.text, r.metadata, r.role, r.occurred_at) for r in todo]
    items = memory.write_in(db, scope, rows, [r.key for r in todo])
    written: set[int] = set()
    for r, item in zip(todo, items, strict=True):
        if item.created_at != now or item.id in written:  # there before (or twice in the file)
            continue
        written.add(item.id)
        if r.created_at is not None:
            db.execute("UPDATE items SET created_at = %s WHERE id = %s", (r.created_at, item.id))
        if r.usage is not None and (r.usage["reads"] or r.usage["used"] or r.usage["heat"]):
            db.execute(
                "INSERT INTO usage (item_id, reads, used, last_read_at, heat, heat_at) "
                "VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (item_id) DO NOTHING",
                (item.id, r.usage["reads"], r.usage["used"], r.usage["last_read_at"], r.usage["heat"]))
    return len(written), len(records) - len(written)
