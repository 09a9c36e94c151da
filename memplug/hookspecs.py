"""Every hook of memplug. This file is the table of contents of the system.

Hooks are called with keyword arguments only. Specs take plain positional
parameters, so later releases can add arguments without breaking plugins: an
implementation names only the arguments it needs. ``docs/hooks.md`` documents
each hook in full, with examples.

Hooks that change data (write, consolidate, forget) run inside one Postgres
transaction, handed over as ``db``: a plugin writes its own tables through it,
so that the whole operation commits or rolls back as one.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("memplug")
hookimpl = pluggy.HookimplMarker("memplug")


# -- lifecycle -----------------------------------------------------------------


@hookspec(historic=True)
def memplug_configure(memory):
    """Set a plugin up for one Memory: migrate its tables, read its options.

    Historic: a plugin registered after the Memory was built is configured on
    registration. Models should be loaded lazily, not here. Returns nothing.
    """


# -- knowledge in --------------------------------------------------------------


@hookspec
def memplug_ingest(memory, scope, records):
    """New text is about to be stored in ``scope``: change it first if need be.

    ``records`` is a list of dicts with ``text``, ``metadata`` and ``role``, one per
    item about to be stored, after validation. An implementation may change
    them in place (mask personal data, normalise, tag metadata); the host
    validates the result again and stores it, in the same transaction. Called
    before ``memplug_write`` and before duplicates are detected. A
    ``wrapper=True`` implementation runs around every other one, so it can
    act before any other plugin sees the text. Returns nothing.
    """




@hookspec
def memplug_write(memory, scope, items, db):
    """New items were stored in ``scope``; keep what this plugin wants of them.

    ``items`` holds only items new to the store (duplicates are filtered out by
    the host). Called for every plugin, in one transaction with the insert.
    Return the ids of the items this tier now holds (the host records them as
    placed at this tier's level), or None.
    """


# -- knowledge out -------------------------------------------------------------


@hookspec
def memplug_read(memory, scope, query, budget, filters, window, db):
    """Contribute to a read: return this tier's hits for ``query``, best first.

    ``filters`` is a mapping that every returned item's metadata must contain
    (or None). ``window`` (a :class:`~memplug.Window`, or None) is the time range
    the read asks for: return items whose :attr:`~memplug.Item.when` it holds (the
    host drops any others, and applies no adapter to a read with a time range).
    Return a list (may be empty) or None. The list holds:

    - :class:`~memplug.Hit` values, best first. A hit with ``pinned=True`` is served
      before every ranked hit, in this tier's order, within the token budget, and
      lands in :attr:`Recall.pinned <memplug.Recall.pinned>` without taking one of
      the ``budget.k`` ranked places (a profile, standing instructions);
    - at most one :class:`~memplug.KVPrefix`, from a tier of explicit memory;
    - at most one :class:`~memplug.AdapterRef`, from a tier of knowledge in the weights.

    The host fuses all tiers' ranked hits by reciprocal rank, keeps the largest
    prefix and adapter, drops duplicates (an item the prefix carries or the
    adapter holds is not repeated as text), applies ``budget`` and records a read
    of every item it returns.
    """


# -- consolidation -------------------------------------------------------------


@hookspec
def memplug_plan(memory, scope, usage):
    """Propose moves between levels for ``scope``, given its ``usage``.

    ``usage`` is a list of :class:`~memplug.usage.ItemUsage`, one per item of
    the scope. Return a list of :class:`~memplug.Move` or None. Every plugin's
    moves are collected; conflicting moves for one item keep the first returned.
    """


@hookspec
def memplug_costs(memory, scope):
    """Report this tier's costs on this deployment, for cost-based policies.

    Return a :class:`~memplug.TierCost` (measured read and write costs, bytes,
    recent writes for ``scope``) or None. Tiers measure as they work and keep
    the figures with :meth:`memplug.Memory.measure`.
    """


@hookspec
def memplug_footprint(memory, item_ids, db):
    """Bytes this tier keeps for each of ``item_ids`` (shared artifacts split evenly).

    Return ``{item_id: bytes}`` for the items it holds, or None. Used by ``memplug inspect``.
    """


@hookspec
def memplug_consolidate(memory, scope, moves, db, progress):
    """Carry out the ``moves`` that concern this tier (as source or destination).

    Runs in the consolidation's transaction, which should stay short: work that
    takes minutes (training) is only taken on here, and done in ``memplug_build``.
    Return the :class:`~memplug.Placement` values of what this tier now holds
    or gave up, or None. The host records the new placements of moved items
    that still exist. ``progress`` is a callable ``progress(task, done, total,
    info)`` for long work, or None.
    """


@hookspec
def memplug_build(memory, scope, moves, progress):
    """Do the slow work this tier took on for ``moves`` (train an adapter), outside any transaction.

    Called after the ``moves`` of a consolidation of ``scope`` committed (``memplug_consolidate``
    has seen them), when there were any. Register what was built in a short transaction
    of your own (``memory.store.scoped(scope)``) and record its placements in that same
    transaction with :meth:`memplug.Memory.place`, so that both commit together. Work
    an interrupted consolidation left undone is the next one's: plan moves for it.
    ``progress`` is as for ``memplug_consolidate``. Return the placements recorded (they
    are reported to the caller), or None.
    """


# -- removal -------------------------------------------------------------------


@hookspec
def memplug_reindex(memory, scope, items, db):
    """Index ``items`` (of ``scope``'s user, in the order written) anew: after a change of embedder
    or of what this tier indexes. Replace the derived rows, never the items. Return how many it
    re-indexed, or None. Called by :meth:`Memory.reindex <memplug.Memory.reindex>` in batches,
    each batch in one transaction.
    """


@hookspec
def memplug_forget(memory, scope, item_ids, db):
    """Remove every trace of ``item_ids`` from this plugin: rows, blobs, adapters.

    Called for every plugin, in one transaction, before the host deletes the
    items themselves. Returns nothing.
    """
