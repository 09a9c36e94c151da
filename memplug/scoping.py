"""SQL filters that confine a query to a scope. Every query on scoped rows uses one."""

from __future__ import annotations

import psycopg

from .errors import NotFound
from .types import Scope, Window


def visible_sql(scope: Scope, alias: str) -> tuple[str, dict[str, str]]:
    """Rows a read in ``scope`` may see: the scope itself and its ancestors."""
    u, a, s = scope.key
    sql = (
        f"{alias}.user_id = %(scope_user)s AND {alias}.agent_id IN ('', %(scope_agent)s) "
        f"AND {alias}.session_id IN ('', %(scope_session)s)"
    )
    return sql, {"scope_user": u, "scope_agent": a, "scope_session": s}


def subtree_sql(scope: Scope, alias: str) -> tuple[str, dict[str, str]]:
    """Rows in ``scope`` and every scope under it (what forgetting the scope removes)."""
    u, a, s = scope.key
    parts = [f"{alias}.user_id = %(scope_user)s"]
    if scope.agent_id is not None:
        parts.append(f"{alias}.agent_id = %(scope_agent)s")
    if scope.session_id is not None:
        parts.append(f"{alias}.session_id = %(scope_session)s")
    return " AND ".join(parts), {"scope_user": u, "scope_agent": a, "scope_session": s}


def window_sql(window: Window | None, alias: str) -> tuple[str, dict[str, object]]:
    """Items (``alias`` is a row of ``items``) that happened within ``window``: ``TRUE`` for None."""
    if window is None:
        return "TRUE", {}
    when = f"coalesce({alias}.occurred_at, {alias}.created_at)"
    parts = [f"{when} >= %(window_since)s"] if window.since is not None else []
    parts += [f"{when} < %(window_until)s"] if window.until is not None else []
    return " AND ".join(parts), {"window_since": window.since, "window_until": window.until}


def check_owned(db: psycopg.Connection, scope: Scope, ids: list[int], visible: bool) -> list[int]:
    """``ids``, if every one is an item a read in ``scope`` can see (``visible``) or one of the
    scope's own subtree; else :class:`NotFound` naming those that are not (nothing is changed)."""
    where, params = (visible_sql if visible else subtree_sql)(scope, "i")
    rows = db.execute(
        f"SELECT i.id FROM items i WHERE i.id = ANY(%(ids)s::bigint[]) AND {where}", {**params, "ids": ids}
    ).fetchall()
    missing = sorted(set(ids) - {r[0] for r in rows})
    if missing:
        raise NotFound(f"item id(s) {missing} not found in scope {scope}; nothing was changed")
    return ids
