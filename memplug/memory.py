"""Memory: write, read, consolidate and forget. The facade; the work is done elsewhere.

Writes go through :mod:`memplug.writes`, reads are fused by :mod:`memplug.fusion`,
consolidation runs in :mod:`memplug.consolidation` (or as a job, :mod:`memplug.jobs`),
answers with the local model come from :mod:`memplug.serving`, and measured costs
are kept by :mod:`memplug.costs`. The tiers themselves are plugins.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, overload

import psycopg

from . import consolidation, inspection, serving, writes
from .consolidation import Progress
from .costs import CostLedger
from .embedded import embedded_dsn
from .errors import InvalidInput
from .fusion import fuse
from .plugins import PluginRegistry
from .rows import ITEM_COLUMNS, item_from_row
from .scoping import check_owned, subtree_sql, visible_sql
from .settings import Settings
from .store import Store
from .types import Answer, Budget, Item, Moment, Move, Placement, Recall, Scope, Window
from .usage import ItemUsage, record_feedback, record_reads, scope_usage
from .validate import (
    check_count,
    check_filters,
    check_ids,
    check_keys,
    check_messages,
    check_metadata,
    check_relevance,
    check_text,
    check_time,
)

log = logging.getLogger(__name__)


class Memory:
    """Memory for LLM agents, across tiers provided by plugins.

    ``Memory()`` uses the embedded Postgres under ``$MEMPLUG_HOME`` and every
    installed plugin; ``Memory("postgresql://...")`` uses an existing Postgres
    with pgvector. ``plugins`` registers extra plugin objects for this Memory;
    ``options`` sets declared options (``memplug options`` lists them), over
    their ``MEMPLUG_<NAME>`` variables. An unknown option or a value out of range
    is a :class:`~memplug.ConfigError`.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        home: str | Path | None = None,
        plugins: Iterable[object] = (),
        load_entrypoints: bool = True,
        options: Mapping[str, Any] | None = None,
        embedder: Any = None,
        settings: Settings | None = None,
    ):
        settings = settings or Settings()
        changes: dict[str, Any] = {}
        if dsn is not None:
            changes["dsn"] = dsn
        if home is not None:
            changes["home"] = Path(home)
        if options is not None:
            if not isinstance(options, Mapping):
                raise InvalidInput(f"options must be a mapping of option names to values, got {type(options).__name__}")
            changes["options"] = {**settings.options, **options}
        self.settings = replace(settings, **changes)
        self._embedder = embedder
        self._token_counter = None
        self._artifacts = None
        self._jobs = None
        self._vllm = None  # the vllm backend's client, made on first use (serving.vllm_model)

        self.plugins = PluginRegistry(self.settings.plugins, plugins, load_entrypoints)
        self.plugins.options.check(self.settings.options, more=self.plugins.declare_installed)
        self.backend = self.option("backend")
        self.plugins.fit_backend(self.backend)
        self.plugins.warn_inactive(self.settings.options)
        self.half_life_s = self.option("heat_half_life_s")
        self.relevance_floor = self.option("relevance_floor")
        self.max_text_chars = self.option("max_text_chars")
        self.max_metadata_bytes = self.option("max_metadata_bytes")
        dsn = self.settings.dsn or embedded_dsn(self.settings.home)
        self.store = Store(dsn, pool_size=self.option("pool_size"))
        self.costs = CostLedger(self.store)
        try:
            serving.check_backend(self)
            self.hook.memplug_configure.call_historic(kwargs={"memory": self})
        except BaseException:
            self.store.close()
            raise

    # -- plumbing ------------------------------------------------------------

    @property
    def hook(self):
        """The pluggy hook relay: ``memory.hook.memplug_read(...)``."""
        return self.plugins.pm.hook

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object for this Memory; it is configured at once."""
        return self.plugins.register(plugin, name=name)

    def option(self, name: str) -> Any:
        """The value of a declared option: ``options[name]``, else ``$MEMPLUG_<NAME>``, else its default.

        Plugins read their own options with it in ``memplug_configure``; an option of an
        installed plugin that is not loaded here has its value too.
        """
        if name not in self.plugins.options:
            self.plugins.declare_installed()
        return self.plugins.options.value(name, self.settings.options)

    @property
    def embedder(self):
        """The sentence embedder shared by the tiers (all-MiniLM-L6-v2 unless given)."""
        if self._embedder is None:
            from .runtime.embedder import Embedder

            self._embedder = Embedder(runtime=self.option("embedder_runtime"))
        return self._embedder

    @property
    def token_counter(self):
        """Counts tokens with the local model's tokenizer."""
        if self._token_counter is None:
            from .runtime.tokenizer import load_token_counter

            self._token_counter = load_token_counter(self.settings.home, self.settings.model)
        return self._token_counter

    @property
    def model(self):
        """What generates replies (option ``backend``): the local causal LM
        (:class:`memplug.runtime.LocalModel`, loaded on first use), or the client of a vLLM server
        (:class:`memplug.runtime.vllm.VLLMModel`; a server on this machine is started on first use)."""
        if self.backend == "vllm":
            return serving.vllm_model(self)
        from .runtime.model import load_model

        return load_model(self.settings.home, self.settings.model)

    @property
    def loaded_model(self):
        """The model if it is loaded already (for vllm: a server is known), else None (never loads,
        never starts one). Tiers unload adapters through it."""
        if self.backend == "vllm":
            return serving.vllm_model(self, start=False)
        from .runtime.model import loaded

        return loaded(self.settings.home, self.settings.model)

    @property
    def model_fingerprint(self) -> str:
        """The local model's fingerprint (what adapters and KV blobs are made for), read from its
        cache without loading it when possible. A vLLM server started here serves the same weights."""
        from .runtime.model import known_fingerprint, load_model

        return known_fingerprint(self.settings.home, self.settings.model) or \
            load_model(self.settings.home, self.settings.model).fingerprint

    def check_adapter_shape(self, *, rank: int, targets: Sequence[str], layers: Sequence[int] | None = None,
                            use_dora: bool = False, bias: str = "none",
                            modules_to_save: Sequence[str] | None = None, where: str = "adapter") -> None:
        """Raise :class:`~memplug.ConfigError` if the backend cannot serve adapters of this shape (the
        ``vllm`` backend accepts some ranks and target modules only); weights tiers call it when configured."""
        if self.backend == "vllm":
            from .runtime.vllm import check_adapter_shape

            check_adapter_shape(rank=rank, targets=targets, max_rank=self.option("vllm_max_lora_rank"),
                                layers=layers, use_dora=use_dora, bias=bias, modules_to_save=modules_to_save,
                                where=where)

    @property
    def artifacts(self):
        """Where tiers keep derived artifacts: option ``artifacts``, or ``$MEMPLUG_HOME/artifacts``."""
        if self._artifacts is None:
            from .artifacts import ArtifactStore

            self._artifacts = ArtifactStore(self.option("artifacts") or self.settings.home / "artifacts")
        return self._artifacts

    def close(self) -> None:
        try:
            self.flush_measurements()
        except Exception:  # noqa: BLE001 - closing must not fail over a lost measurement
            log.debug("could not write buffered measurements on close", exc_info=True)
        if self._jobs is not None:
            self._jobs.close()
        self.store.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- write ---------------------------------------------------------------

    @overload
    def write(self, scope: Scope | str, text: str, metadata: Mapping[str, Any] | None = ..., *,
              occurred_at: Moment | None = ...) -> Item: ...
    @overload
    def write(self, scope: Scope | str, text: Sequence[str],
              metadata: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = ..., *,
              occurred_at: Moment | Sequence[Moment | None] | None = ...) -> list[Item]: ...

    def write(self, scope, text, metadata=None, *, occurred_at=None):
        """Store knowledge: one text (returns its Item) or a list of texts (returns a list).

        ``metadata`` and ``occurred_at`` (when what the text says happened: a datetime,
        a date or an ISO 8601 string; naive times are UTC) apply to every text, or
        are lists with one per text. Identical text already in the scope (at the
        same ``occurred_at``) is not stored twice: its existing item is returned.
        The whole call is one transaction.
        """
        scope = Scope.of(scope)
        single = isinstance(text, str)
        texts = [text] if single else _text_list(text)
        if single:
            metas = [check_metadata(metadata, "metadata", self.max_metadata_bytes)]
            times = [check_time(occurred_at, "occurred_at")]
        else:
            metas = [check_metadata(m, w, self.max_metadata_bytes)
                     for m, w in _each(metadata, len(texts), "metadata")]
            times = [check_time(t, w) for t, w in _each(occurred_at, len(texts), "occurred_at")]
        rows = [(check_text(t, f"text[{n}]" if not single else "text", self.max_text_chars), metas[n], None, times[n])
                for n, t in enumerate(texts)]
        with self.store.scoped(scope) as db:
            items = self.write_in(db, scope, rows)
        return items[0] if single else items

    def put(self, scope: Scope | str, keys: Sequence[str], texts: Sequence[str],
            metadatas: Sequence[Mapping[str, Any] | None] | None = None, *,
            occurred_at: Moment | Sequence[Moment | None] | None = None) -> list[Item]:
        """Store texts under the caller's keys (document ids): one item per key in the scope.

        A key already in the scope is replaced: with the same text (and ``occurred_at``)
        its item is kept (its usage and placements too) and only its metadata updated;
        otherwise the old item is forgotten in every tier and the new one written.
        ``occurred_at`` is one time for all texts or one per text (see :meth:`write`).
        The whole call is one transaction. Returns the items in input order.
        """
        scope = Scope.of(scope)
        keys = [check_text(k, f"keys[{n}]", 512) for n, k in enumerate(_text_list(keys, "keys"))]
        texts = _text_list(texts, "texts")
        metadatas = [None] * len(texts) if metadatas is None else list(metadatas)
        if not len(keys) == len(texts) == len(metadatas):
            raise InvalidInput(f"put needs as many keys, texts and metadatas; got {len(keys)}, {len(texts)}, "
                               f"{len(metadatas)}")
        if len(set(keys)) != len(keys):
            raise InvalidInput(f"put got a key twice: {sorted(k for k in set(keys) if keys.count(k) > 1)[0]!r}")
        texts = [check_text(t, f"texts[{n}]", self.max_text_chars) for n, t in enumerate(texts)]
        metas = [check_metadata(m, f"metadatas[{n}]", self.max_metadata_bytes) for n, m in enumerate(metadatas)]
        times = [check_time(t, w) for t, w in _each(occurred_at, len(texts), "occurred_at")]
        with self.store.scoped(scope) as db:
            return writes.put(self, db, scope, keys, texts, metas, times)

    def get_keys(self, scope: Scope | str, keys: Iterable[str]) -> list[Item]:
        """The items stored under these keys in exactly this scope, in the keys' order (missing keys skipped)."""
        scope = Scope.of(scope)
        keys = check_keys(keys)
        with self.store.scoped(scope) as db:
            by_key = {it.key: it for it in writes.keyed(db, scope, keys)}
        return [by_key[k] for k in dict.fromkeys(keys) if k in by_key]

    def forget_keys(self, scope: Scope | str, keys: Iterable[str]) -> int:
        """Forget the items stored under these keys in exactly this scope; return how many (missing keys are fine)."""
        scope = Scope.of(scope)
        keys = check_keys(keys)
        with self.store.scoped(scope) as db:
            ids = [it.id for it in writes.keyed(db, scope, keys, lock=True)]
            self.forget_in(db, scope, ids)
        return len(ids)

    def write_messages(self, scope: Scope | str, messages: Iterable[Any]) -> list[Item]:
        """Store conversation turns of one session (the scope needs a ``session_id``).

        Turns are held by the level-0 tier within its token budget; turns that fall
        out of it become long-term knowledge of the scope without the session.
        Turns are events, so repeated text is kept, not de-duplicated.
        """
        scope = Scope.of(scope)
        if scope.session_id is None:
            raise InvalidInput("write_messages needs a scope with a session_id, e.g. Scope('alice', session_id='s1')")
        pairs = check_messages(messages, self.max_text_chars)
        rows = [(content, {}, role) for role, content in pairs]
        with self.store.scoped(scope) as db:
            return self.write_in(db, scope, rows)

    def write_in(self, db: psycopg.Connection, scope: Scope,
                 rows: Sequence[tuple[str, Mapping[str, Any], str | None]],
                 keys: Sequence[str] | None = None) -> list[Item]:
        """Insert validated ``(text, metadata, role)`` rows inside the caller's transaction.

        For plugins that create items as part of their own work (the context tier
        flushing turns). Returns the items in input order; new ones reach the tiers.
        ``keys`` (one per row, no key already in the scope) stores them under caller keys.
        """
        return writes.insert(self, db, scope, rows, keys)

    # -- read ----------------------------------------------------------------

    def read(
        self,
        scope: Scope | str,
        query: str,
        budget: Budget | None = None,
        filters: Mapping[str, Any] | None = None,
        *,
        since: Moment | None = None,
        until: Moment | None = None,
        min_relevance: float | None = None,
    ) -> Recall:
        """What the scope's memory holds for ``query``, within ``budget``.

        Each tier contributes a ranked list; the lists are fused by reciprocal
        rank, an item is returned once, and hits are taken best first while they
        fit the token budget and ``budget.k`` (see :func:`memplug.fusion.fuse`).
        Every item returned counts as read. ``filters`` keeps items whose metadata
        contains it (``{"source": "chat"}``). ``since`` and ``until`` keep items whose
        :attr:`~memplug.Item.when` (``occurred_at``, else when written) is at or after
        ``since`` and before ``until``; a read with a time range applies no adapter.
        ``min_relevance`` leaves out hits less relevant to the query than it (for the
        pgvector tier: cosine similarity), so that a read can return nothing when
        nothing is relevant; None takes the option ``relevance_floor``.
        """
        scope = Scope.of(scope)
        query = check_text(query, "query", self.max_text_chars)
        budget = budget if budget is not None else Budget()
        if not isinstance(budget, Budget):
            raise InvalidInput(f"budget must be a memplug.Budget, got {type(budget).__name__}")
        filters = check_filters(filters)
        since, until = check_time(since, "since"), check_time(until, "until")
        window = Window(since, until) if since is not None or until is not None else None
        floor = self.relevance_floor if min_relevance is None else check_relevance(min_relevance)
        # The read's only writes are its usage counts: statistics, committed without waiting for the disk.
        with self.store.scoped(scope, durable=False) as db:
            lists = self.hook.memplug_read(memory=self, scope=scope, query=query, budget=budget, filters=filters,
                                           window=window, db=db)
            recall = fuse(scope, query, lists or [], budget, window, floor or None)
            record_reads(db, list(dict.fromkeys(it.id for it in recall.items)), self.half_life_s)
        return recall

    def reindex(self, scope: Scope | str | None = None, batch: int = 256) -> int:
        """Rebuild the tiers' indexes of the items in ``scope`` and under it (None: every user's), in
        batches of ``batch`` items, each one transaction: after a change of embedder or of what a tier
        indexes (``pgvector_index``). Items, their usage and placements are untouched; an interrupted
        run leaves each item indexed the old way or the new, and can be run again. Returns the number
        of items indexed anew (the most any tier reported)."""
        batch = check_count(batch, "batch", 1)
        if scope is None:
            with self.store.transaction() as db:
                users = [r[0] for r in db.execute("SELECT DISTINCT user_id FROM items ORDER BY 1").fetchall()]
            return sum(self.reindex(Scope(u), batch) for u in users)
        scope = Scope.of(scope)
        where, params = subtree_sql(scope, "i")
        done, after = 0, 0
        while True:
            with self.store.scoped(scope) as db:
                rows = db.execute(f"SELECT {ITEM_COLUMNS} FROM items i WHERE {where} AND i.id > %(after)s "
                                  "ORDER BY i.id LIMIT %(n)s", {**params, "after": after, "n": batch}).fetchall()
                if not rows:
                    return done
                items = [item_from_row(r) for r in rows]
                after = items[-1].id
                by_scope: dict[Scope, list[Item]] = {}
                for it in items:
                    by_scope.setdefault(it.scope, []).append(it)
                for part_scope, part in by_scope.items():
                    counts = self.hook.memplug_reindex(memory=self, scope=part_scope, items=part, db=db)
                    done += max((c for c in counts if c), default=0)

    def feedback(self, scope: Scope | str, item_ids: Iterable[int], used: bool = True) -> None:
        """Report which returned items the answer actually used (feeds the policies)."""
        scope = Scope.of(scope)
        ids = check_ids(item_ids)
        if not isinstance(used, bool):
            raise InvalidInput(f"used must be True or False, got {used!r}")
        if not used or not ids:
            return
        with self.store.scoped(scope) as db:
            check_owned(db, scope, ids, visible=True)
            record_feedback(db, ids)

    # -- answer with the local model -------------------------------------------

    def generate(self, scope: Scope | str, messages: Any, budget: Budget | None = None,
                 filters: Mapping[str, Any] | None = None, **options: Any) -> str:
        """Answer ``messages`` with the local model and the scope's memory.

        Reads with the last user message as the query; text hits go into the
        prompt, explicit memory is injected as KV. ``options`` go to
        :meth:`memplug.runtime.LocalModel.stream` (``max_new_tokens``, ``temperature``...).
        """
        return "".join(self.stream(scope, messages, budget, filters, **options))

    def stream(self, scope: Scope | str, messages: Any, budget: Budget | None = None,
               filters: Mapping[str, Any] | None = None, **options: Any) -> Iterator[str]:
        """Like :meth:`generate`, yielding the answer piece by piece."""
        return serving.stream(self, scope, messages, budget, filters, options)

    def answer(self, scope: Scope | str, messages: Any, budget: Budget | None = None,
               filters: Mapping[str, Any] | None = None, stop: str | None = None, **options: Any) -> Answer:
        """Like :meth:`generate`, returning an :class:`Answer`: the reply, the recall it was given
        (which items came as text, as KV memory or from the adapter), the prompt tokens the model
        read and the time taken. ``stop`` ends the reply where that string first appears."""
        return serving.answer(self, scope, messages, budget, filters, stop, options)

    def respond(self, messages: Any, recall: Recall | None = None, **options: Any) -> Iterator[str]:
        """Stream the local model's reply to ``messages`` with a recall already read (or none).

        For callers that read memory themselves, such as framework adapters that read
        before the model call: text hits go into the prompt, KV memory is injected and the
        adapter applied, exactly as :meth:`stream` does after its own read.
        """
        return serving.respond(self, messages, recall, dict(options))

    # -- costs ---------------------------------------------------------------

    def measure(self, tier: str, metric: str, value: float, db: psycopg.Connection | None = None) -> None:
        """Fold one measurement of a tier's cost into its running mean (see :class:`memplug.costs.CostLedger`).

        Without ``db`` it is buffered (reads measure often); with ``db`` it is written in
        that transaction, whose end then holds the shared row locked.
        """
        self.costs.measure(tier, metric, value, db)

    def flush_measurements(self) -> None:
        """Write buffered measurements now."""
        self.costs.flush()

    def measured(self, tier: str) -> dict[str, tuple[float, int]]:
        """A tier's measured costs: ``{metric: (mean, samples)}``."""
        return self.costs.measured(tier)

    # -- consolidate ---------------------------------------------------------

    def usage(self, scope: Scope | str, subtree: bool = False) -> list[ItemUsage]:
        """Per-item usage of the items a read in ``scope`` can see (or, with ``subtree``,
        of the items in ``scope`` and every scope under it)."""
        scope = Scope.of(scope)
        where, params = (subtree_sql if subtree else visible_sql)(scope, "i")
        with self.store.scoped(scope) as db:
            return scope_usage(db, where, params, self.half_life_s)

    @property
    def jobs(self):
        """The consolidation queue (:class:`memplug.jobs.JobQueue`) in this Memory's database."""
        if self._jobs is None:
            from .jobs import JobQueue

            def run(scope: Scope, moves: list[Move] | None, progress: Progress | None) -> int:
                return len(self.consolidate(scope, moves, progress=progress))

            self._jobs = JobQueue(self.store.dsn, run, attempts=self.option("job_attempts"),
                                  retry_wait_s=self.option("job_retry_wait_s"),
                                  stalled_s=self.option("job_stalled_s"))
        return self._jobs

    def consolidate(self, scope: Scope | str, moves: Iterable[Move] | None = None, *,
                    progress: Progress | None = None) -> list[Placement]:
        """Move knowledge between levels now; return the placements the tiers reported.

        Without ``moves`` the policies plan them from usage. Covers the items of
        ``scope`` and every scope under it; the moves are applied in one short
        transaction, and slow work they start (training an adapter) runs after it,
        outside any transaction. ``progress(task, done, total, info)`` hears about
        that work. To run it in a worker instead, use :meth:`enqueue_consolidation`.
        """
        scope = Scope.of(scope)
        moves = _moves(moves)
        if moves is not None:  # a policy's plan may name a level no tier holds (weights without lora): it idles
            consolidation.check_moves(self.plugins.levels(), moves, self.plugins.unavailable())
        return consolidation.consolidate(self, scope, moves, progress)

    def enqueue_consolidation(self, scope: Scope | str, moves: Iterable[Move] | None = None) -> int:
        """Queue a consolidation of ``scope`` for ``memplug worker``; return the job id.

        Moves naming items outside the scope are refused now; their levels are checked
        where the job runs (a worker may load tiers this process lacks). A planned
        consolidation (no ``moves``) of a scope already waiting returns the waiting job.
        """
        scope = Scope.of(scope)
        moves = _moves(moves)
        if moves:
            with self.store.scoped(scope) as db:
                check_owned(db, scope, sorted({i for m in moves for i in m.item_ids}), visible=False)
        return self.jobs.enqueue(scope, moves)

    def place(self, db: psycopg.Connection, placements: Sequence[Placement],
              why: Mapping[int, str] | None = None) -> None:
        """Record placements a tier reports outside a hook's return value (``memplug_build``), in
        its own transaction ``db``; ``why`` gives, by item id, the reason of the move behind them."""
        consolidation.record_placements(db, placements, why)

    def end_session(self, scope: Scope | str) -> list[Placement]:
        """Move a session's level-0 turns into long-term memory now, instead of when they age out."""
        scope = Scope.of(scope)
        if scope.session_id is None:
            raise InvalidInput("end_session needs a scope with a session_id")
        where, params = subtree_sql(scope, "i")
        with self.store.scoped(scope) as db:
            ids = [r[0] for r in db.execute(
                f"SELECT i.id FROM items i JOIN placements p ON p.item_id = i.id AND p.level = 0 "
                f"WHERE {where} ORDER BY i.id", params).fetchall()]
        if not ids:
            return []
        return consolidation.consolidate(self, scope, [Move(tuple(ids), 0, 1, "session ended")], None)

    # -- forget --------------------------------------------------------------

    def forget(self, scope: Scope | str, item_ids: Iterable[int] | None = None) -> int:
        """Remove items and every trace of them in every tier; return how many.

        With ``item_ids``, those items (each must belong to the scope or a scope
        under it, else nothing is removed). Without, the whole scope and every
        scope under it. One transaction.
        """
        scope = Scope.of(scope)
        with self.store.scoped(scope) as db:
            if item_ids is None:
                where, params = subtree_sql(scope, "i")
                ids = [r[0] for r in db.execute(f"SELECT i.id FROM items i WHERE {where}", params).fetchall()]
            else:
                ids = check_owned(db, scope, check_ids(item_ids), visible=False)
            self.forget_in(db, scope, ids)
        return len(ids)

    def forget_in(self, db: psycopg.Connection, scope: Scope, item_ids: Sequence[int]) -> None:
        """Forget ``item_ids`` inside the caller's transaction (ids already checked)."""
        if not item_ids:
            return
        self.hook.memplug_forget(memory=self, scope=scope, item_ids=list(item_ids), db=db)
        db.execute("DELETE FROM items WHERE id = ANY(%s::bigint[])", (list(item_ids),))

    # -- inspection ----------------------------------------------------------

    def get(self, scope: Scope | str, item_ids: Iterable[int]) -> list[Item]:
        """The items with these ids, if the scope can see them."""
        scope = Scope.of(scope)
        ids = check_ids(item_ids)
        where, params = visible_sql(scope, "i")
        with self.store.scoped(scope) as db:
            check_owned(db, scope, ids, visible=True)
            rows = db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items i WHERE i.id = ANY(%(ids)s) AND {where} ORDER BY i.id",
                {**params, "ids": ids},
            ).fetchall()
        return [item_from_row(r) for r in rows]

    def turns(self, scope: Scope | str) -> list[Item]:
        """The conversation turns the scope's session still holds (oldest first).

        Turns written with :meth:`write_messages` stay here until the context tier
        flushes them to long-term memory (over its token budget, idle, or at
        :meth:`end_session`); after that they are recalled by :meth:`read`.
        """
        scope = Scope.of(scope)
        if scope.session_id is None:
            raise InvalidInput("turns needs a scope with a session_id, e.g. Scope('alice', session_id='s1')")
        u, a, s = scope.key
        with self.store.scoped(scope) as db:
            rows = db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items i WHERE i.user_id = %s AND i.agent_id = %s "
                "AND i.session_id = %s AND i.role IS NOT NULL ORDER BY i.id", (u, a, s)).fetchall()
        return [item_from_row(r) for r in rows]

    def items(self, scope: Scope | str, limit: int = 100, offset: int = 0) -> list[Item]:
        """Items visible in ``scope``, oldest first."""
        scope = Scope.of(scope)
        limit, offset = check_count(limit, "limit"), check_count(offset, "offset")
        where, params = visible_sql(scope, "i")
        with self.store.scoped(scope) as db:
            rows = db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items i WHERE {where} ORDER BY i.id LIMIT %(lim)s OFFSET %(off)s",
                {**params, "lim": limit, "off": offset},
            ).fetchall()
        return [item_from_row(r) for r in rows]

    def stats(self, scope: Scope | str | None = None) -> dict[str, Any]:
        """Counts: items, scopes, turns, items per tier, usage, database size (of ``scope`` and
        the scopes under it, or of the whole store)."""
        return inspection.stats(self, None if scope is None else Scope.of(scope))

    def inspect(self, scope: Scope | str, limit: int = 200) -> list[dict[str, Any]]:
        """Where each item of ``scope`` (and the scopes under it) sits: its level, usage, the
        bytes each tier keeps for it, and the history of its placements with their reasons."""
        return inspection.inspect(self, Scope.of(scope), check_count(limit, "limit"))

    # -- async facade --------------------------------------------------------
    # Hooks are synchronous; the async API runs each call in a worker thread.

    async def awrite(self, *args: Any, **kwargs: Any):
        return await asyncio.to_thread(functools.partial(self.write, *args, **kwargs))

    async def awrite_messages(self, *args: Any, **kwargs: Any) -> list[Item]:
        return await asyncio.to_thread(functools.partial(self.write_messages, *args, **kwargs))

    async def aread(self, *args: Any, **kwargs: Any) -> Recall:
        return await asyncio.to_thread(functools.partial(self.read, *args, **kwargs))

    async def aforget(self, *args: Any, **kwargs: Any) -> int:
        return await asyncio.to_thread(functools.partial(self.forget, *args, **kwargs))

    async def aconsolidate(self, *args: Any, **kwargs: Any) -> list[Placement]:
        """:meth:`consolidate` in a worker thread: the placements."""
        return await asyncio.to_thread(functools.partial(self.consolidate, *args, **kwargs))

    async def aenqueue_consolidation(self, *args: Any, **kwargs: Any) -> int:
        """:meth:`enqueue_consolidation` in a worker thread: the job id."""
        return await asyncio.to_thread(functools.partial(self.enqueue_consolidation, *args, **kwargs))

    async def afeedback(self, *args: Any, **kwargs: Any) -> None:
        return await asyncio.to_thread(functools.partial(self.feedback, *args, **kwargs))


def _each(value: object, n: int, what: str) -> list[tuple[Any, str]]:
    """``value`` for each of ``n`` texts, with the name to report it by: one value for all, or a
    list (or tuple) with one per text."""
    if not isinstance(value, list | tuple):  # one for all (a wrong type: the check names it)
        return [(value, what)] * n
    if len(value) != n:
        raise InvalidInput(f"{what} is a list of {len(value)}; give one for all texts or one per text ({n})")
    return [(v, f"{what}[{k}]") for k, v in enumerate(value)]


def _text_list(text: object, what: str = "text") -> list[str]:
    if isinstance(text, bytes) or not isinstance(text, Sequence) or (what != "text" and isinstance(text, str)):
        kind = "a str or a list of str" if what == "text" else "a list of str"
        raise InvalidInput(f"{what} must be {kind}, got {type(text).__name__}")
    if not text:
        raise InvalidInput(f"{what} is an empty list")
    return list(text)


def _moves(moves: Iterable[Move] | None) -> list[Move] | None:
    if moves is None:
        return None
    if isinstance(moves, Move | str | bytes) or not isinstance(moves, Iterable):
        raise InvalidInput(f"moves must be a list of memplug.Move values, got {type(moves).__name__}")
    moves = list(moves)
    if not all(isinstance(m, Move) for m in moves):
        raise InvalidInput("moves must be memplug.Move values")
    return moves
