"""Find every trace of forgotten items: in every table of the memplug schema and in the artifact store.

After :meth:`Memory.forget`, nothing may still refer to the forgotten items.
:func:`find_traces` looks for them without knowing any tier's tables:

- every column of every table in the ``memplug`` schema (read from the catalog):
  columns named ``item_id`` / ``item_ids`` (or ending in ``_item_id(s)``), and the
  ``id`` of ``items``, for the forgotten ids; every text, JSON and text-array
  column for the forgotten texts (as written, and JSON-escaped); every bytea
  column for the texts' UTF-8 bytes and SHA-256 digests; every ``vector`` /
  ``halfvec`` column of the embedder's dimension for the texts' embeddings;
  with ``scope``, every ``user_id`` / ``agent_id`` / ``session_id`` column for rows
  of that scope or a scope under it;
- every file under the artifact root: a file named after a forgotten id
  (``12.safetensors``), a file whose bytes hold a forgotten text, and a
  safetensors file whose header names a forgotten id under an ``item``-ish key
  (``item_id``, ``item_ids``, ``items``, in JSON values too);
- with the ``vllm`` backend, every adapter the server holds: one whose files
  are gone, one whose header names a forgotten id, and (with ``scope``) one
  named for that scope.

Texts and embeddings are looked for in rows that may belong to the forgotten
items' users (a row with another ``user_id``, or naming another user's item, is
that user's own copy). Texts are matched as substrings, so test with distinctive
texts: a kept item of the same user that contains a forgotten one word for word
is reported too.

Third-party tiers get this through :class:`memplug.testing.TierConformance`; call
it directly in your own tests::

    from memplug.testing import find_traces
    memory.forget(scope, [item.id])
    assert find_traces(memory, [item]) == []
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..store import SCHEMA
from ..types import Item, Scope

TEXT_TYPES = {"text", "varchar", "bpchar", "json", "jsonb", "_text", "_varchar", "_json", "_jsonb", "citext"}
ID_TYPES = {"int8", "int4", "int2", "numeric"}
ID_ARRAY_TYPES = {"_int8", "_int4", "_int2", "_numeric"}
_ID_COLUMN = re.compile(r"(?:^|_)item_ids?$")
# Embeddings closer than this (cosine distance) count as the forgotten item's own.
SAME_VECTOR = 1e-3


@dataclass(frozen=True)
class Trace:
    """One place that still refers to a forgotten item: ``where`` (a table column or an
    artifact key) and ``what`` it holds (the item id, a text, an embedding, the scope)."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def find_traces(memory: Any, items: Sequence[Item], scope: Scope | str | None = None,
                artifacts: bool = True) -> list[Trace]:
    """Every trace of ``items`` left in ``memory``'s database and artifact store (empty when none).

    ``items`` are the forgotten items (their ids and texts are looked for). With
    ``scope``, rows and artifact paths of that scope and every scope under it count
    as traces too (for checking ``forget(scope)``). ``artifacts=False`` skips the files.
    """
    items = list(items)
    scope = Scope.of(scope) if scope is not None else None
    traces = _table_traces(memory, items, scope)
    if artifacts:
        traces += _artifact_traces(memory, items, scope)
    traces += _served_traces(memory, items, scope)
    return traces


def assert_no_traces(memory: Any, items: Sequence[Item], scope: Scope | str | None = None) -> None:
    """Raise AssertionError listing every trace :func:`find_traces` finds."""
    traces = find_traces(memory, items, scope)
    if traces:
        listing = "\n  ".join(str(t) for t in traces[:50])
        raise AssertionError(f"{len(traces)} trace(s) of forgotten items remain:\n  {listing}")


# -- the database -----------------------------------------------------------------------------


def _needles(text: str) -> list[str]:
    """The forms a text takes inside a column cast to text: as is, and JSON-escaped."""
    forms = [text, json.dumps(text, ensure_ascii=False)[1:-1], json.dumps(text)[1:-1]]
    return list(dict.fromkeys(forms))


def _columns(db: Any) -> list[tuple[str, str, str, str]]:
    """``(table, column, type name, formatted type)`` of every column of every table in the schema."""
    return db.execute(
        """
        SELECT c.relname, a.attname, t.typname, format_type(a.atttypid, a.atttypmod)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_type t ON t.oid = a.atttypid
        WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY c.relname, a.attnum
        """, (SCHEMA,)).fetchall()


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _owned(cols: dict[str, Any]) -> str:
    """A condition keeping the rows that may belong to the forgotten items' users: another user
    may have written the same text, and their copy is not a trace."""
    if "user_id" in cols:
        return "user_id = ANY(%(users)s)"
    if "item_id" in cols:
        return (f"NOT EXISTS (SELECT 1 FROM {_q(SCHEMA)}.items o WHERE o.id = item_id "
                "AND o.user_id <> ALL(%(users)s))")
    return "TRUE"


def _table_traces(memory: Any, items: list[Item], scope: Scope | None) -> list[Trace]:
    ids = sorted({it.id for it in items})
    texts = list(dict.fromkeys(it.text for it in items))
    users = sorted({it.scope.user_id for it in items})
    traces: list[Trace] = []
    with memory.store.transaction() as db:  # unscoped: the scan must see every user's rows
        columns = _columns(db)
        by_table: dict[str, dict[str, tuple[str, str]]] = {}
        for table, column, typ, formatted in columns:
            by_table.setdefault(table, {})[column] = (typ, formatted)
        vectors = _embeddings(memory, texts, columns)
        for table, cols in by_table.items():
            target = f"{_q(SCHEMA)}.{_q(table)}"
            owned = _owned(cols)
            for column, (typ, formatted) in cols.items():
                col = _q(column)
                where = f"table {table}.{column}"
                if ids and (_ID_COLUMN.search(column) or (table == "items" and column == "id")):
                    if typ in ID_TYPES:
                        found = db.execute(f"SELECT DISTINCT {col} FROM {target} WHERE {col} = ANY(%s)",
                                           (ids,)).fetchall()
                        traces += [Trace(where, f"item id {r[0]}") for r in found]
                    elif typ in ID_ARRAY_TYPES:
                        found = db.execute(f"SELECT {col} FROM {target} WHERE {col}::bigint[] && %s::bigint[]",
                                           (ids,)).fetchall()
                        traces += [Trace(where, f"item ids {sorted(set(r[0]) & set(ids))}") for r in found]
                if typ in TEXT_TYPES:
                    for text in texts:
                        for needle in _needles(text):
                            n = db.execute(f"SELECT count(*) FROM {target} WHERE strpos({col}::text, %(n)s) > 0 "
                                           f"AND {owned}", {"n": needle, "users": users}).fetchone()[0]
                            if n:
                                traces.append(Trace(where, f"the text {_short(text)} ({n} row(s))"))
                                break
                elif typ == "bytea":
                    for text in texts:
                        for label, needle in (("text", text.encode()),
                                              ("SHA-256 of the text", hashlib.sha256(text.encode()).digest())):
                            n = db.execute(f"SELECT count(*) FROM {target} "
                                           f"WHERE position(%(n)s::bytea in {col}) > 0 AND {owned}",
                                           {"n": needle, "users": users}).fetchone()[0]
                            if n:
                                traces.append(Trace(where, f"the {label} {_short(text)} ({n} row(s))"))
                elif typ in ("vector", "halfvec") and vectors is not None and formatted.endswith(f"({len(vectors[0])})"):
                    for text, vec in zip(texts, vectors, strict=True):
                        n = db.execute(f"SELECT count(*) FROM {target} WHERE ({col} <=> %(v)s::{typ}) < %(d)s "
                                       f"AND {owned}", {"v": _vector_literal(vec), "d": SAME_VECTOR,
                                                        "users": users}).fetchone()[0]
                        if n:
                            traces.append(Trace(where, f"the embedding of {_short(text)} ({n} row(s))"))
            if scope is not None:
                traces += _scope_rows(db, table, target, cols, scope)
    return traces


def _scope_rows(db: Any, table: str, target: str, cols: dict[str, Any], scope: Scope) -> list[Trace]:
    """Rows of ``scope`` or under it, in a table with scope columns able to tell."""
    if "user_id" not in cols:
        return []
    conds, params = ["user_id = %s"], [scope.user_id]
    for part, value in (("agent_id", scope.agent_id), ("session_id", scope.session_id)):
        if value is None:
            continue
        if part not in cols:
            return []  # the table cannot tell this scope's rows from its siblings'
        conds.append(f"{part} = %s")
        params.append(value)
    n = db.execute(f"SELECT count(*) FROM {target} WHERE {' AND '.join(conds)}", params).fetchone()[0]
    return [Trace(f"table {table}", f"{n} row(s) of scope {scope}")] if n else []


def _embeddings(memory: Any, texts: list[str], columns: Iterable[tuple[str, str, str, str]]) -> Any:
    if not texts or not any(typ in ("vector", "halfvec") for _, _, typ, _ in columns):
        return None
    return memory.embedder.encode(texts)


def _vector_literal(vec: Any) -> str:
    return "[" + ",".join(repr(float(x)) for x in vec) + "]"


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


# -- the artifact store ------------------------------------------------------------------------


def _files(store: Any) -> Iterator[tuple[str, Any]]:
    """``(key, reader)`` for every file under the artifact root; links are not followed."""
    if getattr(store, "local", False):
        root = Path(store.root)
        if not root.is_dir():
            return
        for folder, _, names in os.walk(root):
            for name in names:
                path = Path(folder) / name
                if path.is_file() and not path.is_symlink():
                    yield path.relative_to(root).as_posix(), path.read_bytes
        return
    fs, root = store.fs, store.root
    if not fs.exists(root):
        return
    for path in fs.find(root):
        yield path.removeprefix(root).lstrip("/"), (lambda p=path: fs.cat_file(p))


def _artifact_traces(memory: Any, items: list[Item], scope: Scope | None) -> list[Trace]:
    ids = {it.id for it in items}
    needles = [(it.text, n.encode()) for it in items for n in _needles(it.text)]
    traces: list[Trace] = []
    for key, read in _files(memory.artifacts):
        where = f"artifact {key}"
        parts = key.split("/")
        stem = parts[-1].split(".", 1)[0]
        if stem.isdigit() and int(stem) in ids:
            traces.append(Trace(where, f"named after item id {stem}"))
        if scope is not None and _path_in_scope(parts, scope):
            traces.append(Trace(where, f"under a folder of scope {scope}"))
        data = read()
        for text, needle in needles:
            if needle in data:
                traces.append(Trace(where, f"the text {_short(text)}"))
                break
        named = _header_ids(data) & ids
        if named:
            traces.append(Trace(where, f"safetensors header names item id(s) {sorted(named)}"))
    return traces


def _served_traces(memory: Any, items: list[Item], scope: Scope | None) -> list[Trace]:
    """Adapters a model server still holds (the ``vllm`` backend): one whose files are gone (its
    version was deleted), one whose header names a forgotten item, and with ``scope``, one named
    for that scope or a scope under it. Asks the server; nothing is started."""
    model = getattr(memory, "loaded_model", None)
    served = getattr(model, "served_adapters", None)
    if served is None:
        return []
    ids = {it.id for it in items}
    mount = memory.option("vllm_artifacts_path").rstrip("/")
    traces = []
    for name, root in served().items():
        where = f"adapter {name} on the vLLM server"
        served_scope = name.partition("@")[2].split("/")
        if scope is not None and len(served_scope) == 3 and served_scope[0] == scope.user_id and all(
                want is None or got == want
                for got, want in zip(served_scope[1:], (scope.agent_id, scope.session_id), strict=True)):
            traces.append(Trace(where, f"named for scope {scope}"))
        data = None
        weights = "adapter_model.safetensors"
        if mount and root.startswith(mount + "/"):
            key = f"{root[len(mount) + 1:]}/{weights}"
            data = memory.artifacts.get(key) if memory.artifacts.exists(key) else b""
        elif Path(root).is_absolute():
            path = Path(root) / weights
            data = path.read_bytes() if path.is_file() else b""
        if data == b"":
            traces.append(Trace(where, f"still served, but its files at {root} are gone (a deleted version)"))
        elif data is not None and _header_ids(data) & ids:
            traces.append(Trace(where, f"its header names item id(s) {sorted(_header_ids(data) & ids)}"))
    return traces


def _path_in_scope(parts: list[str], scope: Scope) -> bool:
    """Whether a key holds ``user/agent/session`` folders of ``scope`` (``_`` for a part left out),
    the layout the built-in tiers use."""
    want = [scope.user_id, scope.agent_id, scope.session_id]
    for i, part in enumerate(parts[:-1]):
        if part != scope.user_id:
            continue
        rest = parts[i + 1:i + 3]
        if all(w is None or (k < len(rest) and rest[k] == w) for k, w in enumerate(want[1:])):
            return True
    return False


def _header_ids(data: bytes) -> set[int]:
    """Item ids named in a safetensors header's metadata (none if it is not safetensors)."""
    if len(data) < 8:
        return set()
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= min(len(data) - 8, 100 << 20):
        return set()
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        return set()
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    found: set[int] = set()
    for key, value in (meta or {}).items():
        with contextlib.suppress(TypeError, ValueError):  # a plain string stays as it is
            value = json.loads(value)
        found |= _ids_in(key, value)
    return found


def _ids_in(key: str, value: Any) -> set[int]:
    if isinstance(value, dict):
        return {i for k, v in value.items() for i in _ids_in(str(k), v)}
    if "item" not in key.lower():
        return set()
    if isinstance(value, list):
        return {i for v in value for i in _ids_in(key, v)}
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, str) and value.isdigit():
        return {int(value)}
    return set()
