"""``memplug new-plugin NAME``: a working tier plugin package to start from.

The generated tier ("most recent first") is small but complete: its own table
through a migration, placements on write, scope-confined reads, a footprint,
forgetting, an option, and a test that runs the conformance suite.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InvalidInput

_PYPROJECT = '''[build-system]
requires = ["setuptools>=69", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "memplug-@@DIST@@"
version = "0.1.0"
description = "A memplug memory tier: @@NAME@@."
requires-python = ">=3.11"
dependencies = ["memplug"]

[project.optional-dependencies]
test = ["pytest>=8"]

# memplug finds the tier through this entry point (select it with MEMPLUG_PLUGINS).
[project.entry-points.memplug]
@@NAME@@ = "memplug_@@NAME@@:@@CLASS@@"

[tool.setuptools]
packages = ["memplug_@@NAME@@"]
'''

_TIER = '''"""Tier ``@@NAME@@`` (level 1): the most recently written items of a scope, newest first.

Replace the read with what your tier is for; keep the rest of the shape:
- ``options`` declares its settings; ``memplug_configure`` creates the tier's own table through a
  migration (confined to each user by ``row_security``) and reads the options;
- ``memplug_write`` records new items inside the write's transaction and reports placements;
- ``memplug_read`` returns ranked hits, confined to what the scope can see;
- ``memplug_footprint`` reports bytes per item; ``memplug_forget`` removes every trace.
"""

from __future__ import annotations

from psycopg.types.json import Jsonb

from memplug.plugin import ITEM_COLUMNS, Hit, Option, Placement, hookimpl, item_from_row, row_security, visible_sql

# Append new migrations; never edit one that has shipped.
MIGRATIONS = (
    """
    CREATE TABLE @@NAME@@_items (
        item_id    bigint PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
        user_id    text NOT NULL,
        written_at timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE INDEX @@NAME@@_items_user ON @@NAME@@_items (user_id, written_at DESC);
    """,
    # Row-level security: a scoped transaction (every hook's db) sees its own user's rows only.
    row_security("@@NAME@@_items"),
)


class @@CLASS@@:
    """The newest items first (option ``@@NAME@@_limit``, 20)."""

    name = "@@NAME@@"
    level = 1
    # Every setting, declared once: `memplug options` lists it, Memory(options=...) and
    # MEMPLUG_@@UPPER@@_LIMIT set it, and a value out of range is refused with a clear error.
    options = (Option("@@NAME@@_limit", int, 20, "Items one read returns at most.", min=1),)

    @hookimpl
    def memplug_configure(self, memory):
        memory.store.migrate("@@NAME@@", MIGRATIONS)
        self.limit = memory.option("@@NAME@@_limit")

    @hookimpl
    def memplug_write(self, scope, items, db):
        knowledge = [it for it in items if it.role is None]  # conversation turns belong to the context tier
        if not knowledge:
            return None
        with db.cursor() as cur:
            cur.executemany("INSERT INTO @@NAME@@_items (item_id, user_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                            [(it.id, scope.user_id) for it in knowledge])
        return [Placement(self.name, self.level, [it.id for it in knowledge], "written")]

    @hookimpl
    def memplug_read(self, scope, budget, filters, db):
        where, params = visible_sql(scope, "i")
        if filters:
            where += " AND i.metadata @> %(filters)s"
            params["filters"] = Jsonb(filters)
        params["n"] = min(self.limit, budget.k)
        rows = db.execute(
            f"SELECT {ITEM_COLUMNS} FROM @@NAME@@_items r JOIN items i ON i.id = r.item_id "
            f"WHERE r.user_id = %(scope_user)s AND {where} ORDER BY r.written_at DESC, r.item_id DESC LIMIT %(n)s",
            params).fetchall()
        return [Hit(item_from_row(r), self.name, 1.0 / (1 + n)) for n, r in enumerate(rows)]

    @hookimpl
    def memplug_footprint(self, item_ids, db):
        rows = db.execute("SELECT item_id, pg_column_size(r.*) FROM @@NAME@@_items r "
                          "WHERE item_id = ANY(%s::bigint[])", (list(item_ids),)).fetchall()
        return {item_id: int(size) for item_id, size in rows}

    @hookimpl
    def memplug_forget(self, item_ids, db):
        db.execute("DELETE FROM @@NAME@@_items WHERE item_id = ANY(%s::bigint[])", (list(item_ids),))
'''

_TEST = '''"""The tier passes memplug's conformance suite (fixtures come from memplug's pytest plugin)."""

from memplug.testing import TierConformance
from memplug_@@NAME@@ import @@CLASS@@


class Test@@CLASS@@(TierConformance):
    plugin = @@CLASS@@
'''

_README = '''# memplug-@@DIST@@

A memplug memory tier, `@@NAME@@`.

```sh
pip install -e ".[test]"
pytest                                  # memplug's conformance suite, against an embedded Postgres
MEMPLUG_PLUGINS=context,pgvector,@@NAME@@ memplug plugins   # installed, found through its entry point
```
'''


def new_plugin(name: str, parent: Path) -> Path:
    """Write the package for tier ``name`` under ``parent``; return its folder.

    ``name`` is lower case, in snake or kebab case (``my_tier``, ``my-tier``): the tier, its
    tables and options are named in snake case, the distribution and folder in kebab case
    (``memplug-my-tier``), the package ``memplug_my_tier``.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*", name) or len(name) > 40:
        raise InvalidInput(f"plugin name {name!r} must be lower case words of letters and digits, joined by _ or - "
                           "(e.g. my_tier or my-tier), starting with a letter, at most 40 characters")
    name = name.replace("-", "_")
    root = Path(parent) / f"memplug-{name.replace('_', '-')}"
    if root.exists():
        raise InvalidInput(f"{root} already exists; choose another name or folder")
    cls = "".join(part.capitalize() for part in name.split("_")) + "Tier"
    files = {
        "pyproject.toml": _PYPROJECT,
        f"memplug_{name}/__init__.py": _TIER,
        "tests/test_conformance.py": _TEST,
        "README.md": _README,
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("@@NAME@@", name).replace("@@CLASS@@", cls).replace("@@UPPER@@", name.upper())
                        .replace("@@DIST@@", name.replace("_", "-")))
    return root
