"""The plugin SDK: everything a memory tier or a policy needs, in one import.

    from memplug.plugin import Hit, Option, Placement, hookimpl, item_from_row, ITEM_COLUMNS, visible_sql

A tier is an object with ``name`` and ``level`` attributes implementing the
hooks of :mod:`memplug.hookspecs` with :data:`hookimpl`; a policy implements
``memplug_plan``. Hooks receive the :class:`~memplug.Memory`, which offers the
rest: ``memory.store`` (``scoped``, ``migrate``, ``on_commit``, ``on_rollback``),
``memory.option(name)``, ``memory.embedder``, ``memory.model`` (the local model,
:mod:`memplug.runtime`), ``memory.artifacts``, ``memory.measure`` and, for work
that creates or removes items in a hook's transaction, ``memory.write_in`` and
``memory.forget_in``.

Besides ``name`` and ``level``, a plugin may set:

- ``options``: a tuple of :class:`Option`, its settings (names prefixed with the
  plugin's name by convention), read with ``memory.option(name)``;
- ``requires`` (module names) and ``install`` (the command that installs them):
  without them the plugin is listed as unavailable instead of loaded;
- ``opt_in = True``: installed, it loads only when ``MEMPLUG_PLUGINS`` names it.

Built-in tiers import nothing else of memplug's, and neither should yours.
"""

from __future__ import annotations

from .artifacts import write_atomic
from .errors import (
    ArtifactCorrupt,
    ConfigError,
    InvalidInput,
    InvalidScope,
    MemplugError,
    ModelMismatch,
    ModelUnavailable,
    NotFound,
    PluginError,
    ScopeViolation,
    StoreUnavailable,
)
from .fusion import RRF_K
from .hookspecs import hookimpl
from .options import Option, flag
from .rows import ITEM_COLUMNS, ITEM_WIDTH, item_from_row
from .scoping import subtree_sql, visible_sql, window_sql
from .store import APP_ROLE, SCHEMA, USER_SETTING, row_security
from .types import (
    AdapterRef,
    Budget,
    Hit,
    Item,
    KVPrefix,
    Move,
    Placement,
    Recall,
    Scope,
    TierCost,
    Window,
    adapter_name,
    memories_text,
)
from .usage import ItemUsage

__all__ = [
    # hooks and options
    "hookimpl", "Option", "flag",
    # the values hooks take and return
    "AdapterRef", "Budget", "Hit", "Item", "ItemUsage", "KVPrefix", "Move", "Placement", "Recall", "Scope",
    "TierCost", "Window", "adapter_name",
    # rows of the host's items table, and the SQL that confines a query to a scope (and a time range)
    "ITEM_COLUMNS", "ITEM_WIDTH", "item_from_row", "visible_sql", "subtree_sql", "window_sql",
    # the tables' schema, row-level security for a tier's own tables, and the names it uses
    "SCHEMA", "APP_ROLE", "USER_SETTING", "row_security",
    # reciprocal rank fusion's constant, for a tier that fuses rankings of its own
    "RRF_K",
    # memories as Recall.as_text() writes them in a prompt; a file written whole or not at all
    "memories_text", "write_atomic",
    # errors
    "ArtifactCorrupt", "ConfigError", "InvalidInput", "InvalidScope", "MemplugError", "ModelMismatch",
    "ModelUnavailable", "NotFound", "PluginError", "ScopeViolation", "StoreUnavailable",
]
