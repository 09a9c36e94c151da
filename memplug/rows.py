"""Items as rows: the columns to select and the :class:`~memplug.Item` built from them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .types import Item, Scope

# Select these from ``items i`` to build items: ``SELECT {ITEM_COLUMNS} FROM items i ...``.
ITEM_COLUMNS = "i.id, i.user_id, i.agent_id, i.session_id, i.text, i.metadata, i.created_at, i.tokens, i.role, i.key, i.occurred_at"
ITEM_WIDTH = ITEM_COLUMNS.count(",") + 1  # how many leading columns item_from_row takes


def item_from_row(row: Sequence[Any]) -> Item:
    """Build an :class:`Item` from a row that starts with ``ITEM_COLUMNS`` (later columns are ignored)."""
    id_, user, agent, session, text, metadata, created_at, tokens, role, key, occurred_at = row[:ITEM_WIDTH]
    scope = Scope(user, agent or None, session or None)
    return Item(id_, scope, text, metadata, created_at, tokens, role, key, occurred_at)
