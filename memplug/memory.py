"""Memory: write, read, consolidate and forget. Orchestration only; tiers do the work."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, overload

import psycopg
from psycopg.types.json import Jsonb

from .embedded import embedded_dsn
from .errors import ConfigError, InvalidInput, NotFound
from .plugins import PluginRegistry
from .scoping import subtree_sql, visible_sql
from .settings import Settings
from .store import Store
from .types import AdapterRef, Answer, Budget, Hit, Item, KVPrefix, Move, Placement, Recall, Scope
from .usage import DEFAULT_HALF_LIFE_S, ItemUsage, record_feedback, record_reads, scope_usage
from .validate import (
    check_count,
    check_filters,
    check_ids,
    check_keys,
    check_messages,
    check_metadata,
    check_text,
)

# Reciprocal rank fusion constant (Cormack et al., 2009).
RRF_K = 60
ITEM_COLUMNS = "i.id, i.user_id, i.agent_id, i.session_id, i.text, i.metadata, i.created_at, i.tokens, i.role, i.key"
ITEM_WIDTH = ITEM_COLUMNS.count(",") + 1  # columns item_from_row takes


log = logging.getLogger(__name__)


def item_from_row(row: Sequence[Any]) -> Item:
    """Build an :class:`Item` from a row selected as ``ITEM_COLUMNS``."""
    id_, user, agent, session, text, metadata, created_at, tokens, role, key = row[:ITEM_WIDTH]
    scope = Scope(user, agent or None, session or None)
    return Item(id_, scope, text, metadata, created_at, tokens, role, key)


def _flatten(results: Iterable[Iterable[Any] | None]) -> list[Any]:
    return [x for r in results if r for x in r]


class Memory:
    """Memory for LLM agents, across tiers provided by plugins.

    ``Memory()`` uses the embedded Postgres under ``$MEMPLUG_HOME`` and every
    installed plugin; ``Memory("postgresql://...")`` uses an existing Postgres
    with pgvector. ``plugins`` registers extra plugin objects for this Memory;
    ``options`` sets plugin settings (see :meth:`Settings.option`).
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
        if options:
            changes["options"] = {**settings.options, **options}
        self.settings = replace(settings, **changes)
        self._embedder = embedder
        self._token_counter = None
        self._artifacts = None
        self.half_life_s = self.settings.option("heat_half_life_s", DEFAULT_HALF_LIFE_S, float)
        if not 0 < self.half_life_s < math.inf:
            raise ConfigError(f"setting heat_half_life_s={self.half_life_s!r} must be > 0")
        self.max_text_chars = self.settings.max_text_chars
        self.max_metadata_bytes = self.settings.max_metadata_bytes
        self._measure_lock = threading.Lock()
        self._pending_costs: dict[tuple[str, str], tuple[float, int]] = {}
        self._jobs = None

        self.plugins = PluginRegistry(self.settings.plugins, (), load_entrypoints)
        dsn = self.settings.dsn or embedded_dsn(self.settings.home)
        self.store = Store(dsn, pool_size=self.settings.positive("pool_size", 10))
        try:
            self.hook.memplug_configure.call_historic(kwargs={"memory": self})
            for plugin in plugins:
                self.register(plugin)
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

    @property
    def embedder(self):
        """The sentence embedder shared by the tiers (all-MiniLM-L6-v2 unless given)."""
        if self._embedder is None:
            from .runtime.embedder import Embedder

            self._embedder = Embedder()
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
        """The local causal LM (:class:`memplug.runtime.chat.LocalModel`), loaded on first use."""
        from .runtime.model import load_model

        return load_model(self.settings.home, self.settings.model)

    @property
    def model_fingerprint(self) -> str:
        """The local model's fingerprint, read from its cache without loading it when possible."""
        from .runtime.model import known_fingerprint

        return known_fingerprint(self.settings.home, self.settings.model) or self.model.fingerprint

    @property
    def artifacts(self):
        """Where tiers keep derived artifacts: ``MEMPLUG_ARTIFACTS``, or ``$MEMPLUG_HOME/artifacts``."""
        if self._artifacts is None:
            from .artifacts import ArtifactStore

            root = self.settings.option("artifacts", None, str) or self.settings.home / "artifacts"
            self._artifacts = ArtifactStore(root)
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
    def write(self, scope: Scope | str, text: str, metadata: Mapping[str, Any] | None = ...) -> Item: ...
    @overload
    def write(self, scope: Scope | str, text: Sequence[str], metadata: Mapping[str, Any] | None = ...) -> list[Item]: ...

    def write(self, scope, text, metadata=None):
        """Store knowledge: one text (returns its Item) or a list of texts (returns a list).

        Identical text already in the scope is not stored twice: its existing item
        is returned. The whole call is one transaction.
        """
        scope = Scope.of(scope)
        single = isinstance(text, str)
        texts = [text] if single else self._text_list(text)
        meta = check_metadata(metadata, "metadata", self.max_metadata_bytes)
        rows = [(check_text(t, f"text[{n}]" if not single else "text", self.max_text_chars), meta, None)
                for n, t in enumerate(texts)]
        with self.store.scoped(scope) as db:
            items = self.write_in(db, scope, rows)
        return items[0] if single else items

    def put(self, scope: Scope | str, keys: Sequence[str], texts: Sequence[str],
            metadatas: Sequence[Mapping[str, Any] | None] | None = None) -> list[Item]:
        """Store texts under the caller's keys (document ids): one item per key in the scope.

        A key already in the scope is replaced: with the same text its item is kept
        (its usage and placements too) and only its metadata updated; with new text
        the old item is forgotten in every tier and the new one written. The whole
        call is one transaction. Returns the items in input order.
        """
        scope = Scope.of(scope)
        keys = [check_text(k, f"keys[{n}]", 512) for n, k in enumerate(self._text_list(keys, "keys"))]
        texts = self._text_list(texts, "texts")
        metadatas = [None] * len(texts) if metadatas is None else list(metadatas)
        if not len(keys) == len(texts) == len(metadatas):
            raise InvalidInput(f"put needs as many keys, texts and metadatas; got {len(keys)}, {len(texts)}, "
                               f"{len(metadatas)}")
        if len(set(keys)) != len(keys):
            raise InvalidInput(f"put got a key twice: {sorted(k for k in set(keys) if keys.count(k) > 1)[0]!r}")
        texts = [check_text(t, f"texts[{n}]", self.max_text_chars) for n, t in enumerate(texts)]
        metas = [check_metadata(m, f"metadatas[{n}]", self.max_metadata_bytes) for n, m in enumerate(metadatas)]
        u, a, s = scope.key
        with self.store.scoped(scope) as db:
            old = {r[-1]: r for r in db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items i WHERE i.user_id = %s AND i.agent_id = %s "
                "AND i.session_id = %s AND i.key = ANY(%s) FOR UPDATE", (u, a, s, keys)).fetchall()}
            kept: dict[str, Item] = {}
            stale: list[int] = []
            for key, text, meta in zip(keys, texts, metas, strict=True):
                row = old.get(key)
                if row is None:
                    continue
                if row[4] == text:
                    if dict(row[5]) != meta:
                        db.execute("UPDATE items SET metadata = %s WHERE id = %s", (Jsonb(meta), row[0]))
                    kept[key] = item_from_row((*row[:5], meta, *row[6:]))
                else:
                    stale.append(row[0])
            self.forget_in(db, scope, stale)
            todo = [n for n, k in enumerate(keys) if k not in kept]
            written = iter(self.write_in(db, scope, [(texts[n], metas[n], None) for n in todo],
                                         [keys[n] for n in todo]) if todo else [])
            return [kept[k] if k in kept else next(written) for k in keys]

    @staticmethod
    def _keyed(db: psycopg.Connection, scope: Scope, keys: Iterable[str], lock: bool = False) -> list[Item]:
        """Items stored under ``keys`` in exactly ``scope``."""
        keys = check_keys(keys)
        rows = db.execute(
            f"SELECT {ITEM_COLUMNS} FROM items i WHERE i.user_id = %s AND i.agent_id = %s AND i.session_id = %s "
            f"AND i.key = ANY(%s){' FOR UPDATE' if lock else ''}", (*scope.key, keys)).fetchall()
        return [item_from_row(r) for r in rows]

    def get_keys(self, scope: Scope | str, keys: Iterable[str]) -> list[Item]:
        """The items stored under these keys in exactly this scope, in the keys' order (missing keys skipped)."""
        scope = Scope.of(scope)
        keys = check_keys(keys)
        with self.store.scoped(scope) as db:
            by_key = {it.key: it for it in self._keyed(db, scope, keys)}
        return [by_key[k] for k in dict.fromkeys(keys) if k in by_key]

    def forget_keys(self, scope: Scope | str, keys: Iterable[str]) -> int:
        """Forget the items stored under these keys in exactly this scope; return how many (missing keys are fine)."""
        scope = Scope.of(scope)
        with self.store.scoped(scope) as db:
            ids = [it.id for it in self._keyed(db, scope, keys, lock=True)]
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

    def write_in(
        self,
        db: psycopg.Connection,
        scope: Scope,
        rows: Sequence[tuple[str, Mapping[str, Any], str | None]],
        keys: Sequence[str] | None = None,
    ) -> list[Item]:
        """Insert validated ``(text, metadata, role)`` rows inside the caller's transaction.

        For plugins that create items as part of their own work (the context tier
        flushing turns). Returns the items in input order; new ones reach the tiers.
        ``keys`` (one per row, no key already in the scope) stores them under caller keys.
        """
        keys = list(keys) if keys is not None else [None] * len(rows)
        rows = self._ingest(scope, rows)
        hashes = [_content_hash(text, role, key) for (text, _, role), key in zip(rows, keys, strict=True)]
        tokens = self.token_counter.count_many([text for text, _, _ in rows])
        u, a, s = scope.key
        inserted = db.execute(
            """
            INSERT INTO items (user_id, agent_id, session_id, role, text, metadata, content_hash, tokens, key)
            SELECT %(u)s, %(a)s, %(s)s, t.role, t.text, t.metadata, t.content_hash, t.tokens, t.key
            FROM unnest(%(roles)s::text[], %(texts)s::text[], %(metas)s::jsonb[], %(hashes)s::bytea[],
                        %(tokens)s::int[], %(keys)s::text[])
                 WITH ORDINALITY AS t(role, text, metadata, content_hash, tokens, key, ord)
            ORDER BY t.ord
            ON CONFLICT (user_id, agent_id, session_id, content_hash) DO NOTHING
            RETURNING id, content_hash
            """,
            {
                "u": u, "a": a, "s": s,
                "roles": [r for _, _, r in rows],
                "texts": [t for t, _, _ in rows],
                "metas": [Jsonb(m) for _, m, _ in rows],
                "hashes": hashes,
                "tokens": tokens,
                "keys": keys,
            },
        ).fetchall()
        new_ids = {i for i, _ in inserted}
        found = db.execute(
            f"SELECT {ITEM_COLUMNS}, i.content_hash FROM items i "
            "WHERE i.user_id = %s AND i.agent_id = %s AND i.session_id = %s AND i.content_hash = ANY(%s)",
            (u, a, s, list(set(hashes))),
        ).fetchall()
        by_hash = {bytes(r[-1]): item_from_row(r[:-1]) for r in found}
        items = [by_hash[h] for h in hashes]
        new = list({it.id: it for it in items if it.id in new_ids}.values())
        if new:
            placed = _flatten(self.hook.memplug_write(memory=self, scope=scope, items=new, db=db))
            self._apply_placements(db, placed)
        return items

    def _ingest(self, scope: Scope, rows: Sequence[tuple[str, Mapping[str, Any], str | None]]
                ) -> list[tuple[str, Mapping[str, Any], str | None]]:
        """Let ``memplug_ingest`` plugins change the rows, then validate what they left."""
        records = [{"text": t, "metadata": dict(m), "role": r} for t, m, r in rows]
        self.hook.memplug_ingest(memory=self, scope=scope, records=records)
        if len(records) != len(rows):
            raise InvalidInput(f"a memplug_ingest plugin changed the number of records ({len(rows)} -> {len(records)})")
        return [(check_text(rec["text"], f"text[{n}] after memplug_ingest", self.max_text_chars),
                 check_metadata(rec["metadata"], f"metadata[{n}] after memplug_ingest", self.max_metadata_bytes),
                 rec["role"]) for n, rec in enumerate(records)]

    @staticmethod
    def _text_list(text: object, what: str = "text") -> list[str]:
        if isinstance(text, bytes) or not isinstance(text, Sequence) or (what != "text" and isinstance(text, str)):
            kind = "a str or a list of str" if what == "text" else "a list of str"
            raise InvalidInput(f"{what} must be {kind}, got {type(text).__name__}")
        if not text:
            raise InvalidInput(f"{what} is an empty list")
        return list(text)

    # -- read ----------------------------------------------------------------

    def read(
        self,
        scope: Scope | str,
        query: str,
        budget: Budget | None = None,
        filters: Mapping[str, Any] | None = None,
    ) -> Recall:
        """What the scope's memory holds for ``query``, within ``budget``.

        Each tier contributes a ranked list; the lists are fused by reciprocal
        rank, an item is returned once, and hits are taken best first while they
        fit the token budget and ``budget.k``. Every item returned counts as read.
        ``filters`` keeps items whose metadata contains it (``{"source": "chat"}``).
        """
        scope = Scope.of(scope)
        query = check_text(query, "query", self.max_text_chars)
        budget = budget if budget is not None else Budget()
        if not isinstance(budget, Budget):
            raise InvalidInput(f"budget must be a memplug.Budget, got {type(budget).__name__}")
        filters = check_filters(filters)
        with self.store.scoped(scope) as db:
            lists = self.hook.memplug_read(
                memory=self, scope=scope, query=query, budget=budget, filters=filters, db=db
            )
            recall = self._fuse(scope, query, lists or [], budget)
            record_reads(db, [it.id for it in recall.items], self.half_life_s)
        return recall

    @staticmethod
    def _fuse(scope: Scope, query: str, lists: Iterable[Iterable[Hit | KVPrefix | AdapterRef] | None],
              budget: Budget) -> Recall:
        fused: dict[int, float] = {}
        best: dict[int, Hit] = {}
        by_tier: dict[str, list[Hit]] = {}
        prefixes: list[KVPrefix] = []
        adapters: list[AdapterRef] = []
        pinned: list[Hit] = []
        for hit in _flatten(lists):
            if isinstance(hit, KVPrefix):
                prefixes.append(hit)
                continue
            if isinstance(hit, AdapterRef):
                adapters.append(hit)
                continue
            if not isinstance(hit, Hit):
                raise InvalidInput(f"a memplug_read hook returned {type(hit).__name__}, not a memplug.Hit")
            if hit.pinned:
                pinned.append(hit)
                continue
            by_tier.setdefault(hit.tier, []).append(hit)
        # One adapter is applied (the one holding most items): what it holds is not repeated.
        adapter = max(adapters, key=lambda a: (len(a.items), a.tier), default=None)
        held = {it.id for it in adapter.items} if adapter else set()
        # One prefix is injected (the largest); an item it carries is not repeated as text.
        kv = max(prefixes, key=lambda p: (len(p.items), p.tier), default=None)
        if kv is not None:
            kv = kv.without(held) if kv.items else None
        served = {it.id for it in kv.items} if kv else set()
        left_out = set(kv.left_out) - held - served if kv else set()
        for hits in by_tier.values():
            seen: set[int] = set()
            for rank, hit in enumerate(hits, start=1):
                if hit.item.id in seen:
                    continue
                seen.add(hit.item.id)
                fused[hit.item.id] = fused.get(hit.item.id, 0.0) + 1.0 / (RRF_K + rank)
                if hit.item.id not in best or hit.score > best[hit.item.id].score:
                    best[hit.item.id] = hit
        # The top k items, whichever tier serves them: an item held by the adapter or
        # carried by the KV prefix takes its slot without prompt tokens.
        # Pinned hits come first, in their tier's order, within the token budget; they do not take
        # the ranked items' k slots.
        out: list[Hit] = []
        placed: set[int] = set()
        spent = 0
        for hit in pinned:
            if hit.item.id not in placed and spent + hit.item.tokens <= budget.tokens:
                out.append(hit)
                placed.add(hit.item.id)
                spent += hit.item.tokens
        first = len(out)
        covered: list[Hit] = []
        injected: set[int] = set()
        ranked = [i for i in sorted(fused, key=lambda i: (-fused[i], i)) if i not in placed]
        passed = 0  # items left out by the KV prefix: they keep their place, unserved, not filled from below
        for item_id in ranked:
            if len(out) - first + len(covered) + len(injected) + passed >= budget.k:
                break
            hit = best[item_id]
            if item_id in left_out:
                passed += 1
            elif item_id in held:
                covered.append(hit)  # no prompt tokens; kept for a model that needs them as text
            elif item_id in served:
                injected.add(item_id)
            elif spent + hit.item.tokens <= budget.tokens:
                out.append(hit)  # a smaller hit further down may still fit after a skip
                spent += hit.item.tokens
        if kv is not None and fused:
            kv = kv.without(served - injected)  # KV items outside the top k are not injected
            if kv is not None:
                # The best-ranked item goes last, next to the question: chunks encoded apart are
                # told apart worse than text, and the nearest one is read best.
                rank = {i: n for n, i in enumerate(ranked)}
                kv = kv.ordered(sorted((it.id for it in kv.items), key=lambda i: -rank[i]))
        return Recall(scope=scope, query=query, hits=tuple(out), tokens=spent, kv=kv, adapter=adapter,
                      covered=tuple(covered))

    # -- answer with the local model -------------------------------------------

    def generate(self, scope: Scope | str, messages: Any, budget: Budget | None = None,
                 filters: Mapping[str, Any] | None = None, **options: Any) -> str:
        """Answer ``messages`` with the local model and the scope's memory.

        Reads with the last user message as the query; text hits go into the
        prompt, explicit memory is injected as KV. ``options`` go to
        :meth:`memplug.runtime.chat.LocalModel.stream` (``max_new_tokens``, ``temperature``...).
        """
        return "".join(self.stream(scope, messages, budget, filters, **options))

    def stream(self, scope: Scope | str, messages: Any, budget: Budget | None = None,
               filters: Mapping[str, Any] | None = None, **options: Any) -> Iterator[str]:
        """Like :meth:`generate`, yielding the answer piece by piece."""
        msgs, recall = self._recall_for(scope, messages, budget, filters)
        return self._stream(msgs, recall, options)

    def answer(self, scope: Scope | str, messages: Any, budget: Budget | None = None,
               filters: Mapping[str, Any] | None = None, stop: str | None = None, **options: Any) -> Answer:
        """Like :meth:`generate`, returning an :class:`Answer`: the reply, the recall it was given
        (which items came as text, as KV memory or from the adapter), the prompt tokens the model
        read and the time taken. ``stop`` ends the reply where that string first appears."""
        if stop is not None and (not isinstance(stop, str) or not stop):
            raise InvalidInput(f"stop must be a non-empty string, got {stop!r}")
        started = time.perf_counter()
        msgs, recall = self._recall_for(scope, messages, budget, filters)
        prompt = {"tokens": 0}
        first = None
        text = ""
        caller = options.pop("on_prefill", None)

        def prefill(tokens: int, seconds: float) -> None:
            prompt["tokens"] = tokens
            if caller is not None:
                caller(tokens, seconds)
        for piece in self._stream(msgs, recall, {**options, "on_prefill": prefill}):
            first = first if first is not None else time.perf_counter() - started
            text += piece
            if stop is not None and stop in text:
                text = text[:text.index(stop)]
                break
        seconds = time.perf_counter() - started
        return Answer(text, recall, prompt["tokens"], seconds if first is None else first, seconds)

    def respond(self, messages: Any, recall: Recall | None = None, **options: Any) -> Iterator[str]:
        """Stream the local model's reply to ``messages`` with a recall already read (or none).

        For callers that read memory themselves, such as framework adapters that read
        before the model call: text hits go into the prompt, KV memory is injected and the
        adapter applied, exactly as :meth:`stream` does after its own read.
        """
        from .runtime.chat import chat_messages

        if recall is not None and not isinstance(recall, Recall):
            raise InvalidInput(f"recall must be a memplug.Recall, got {type(recall).__name__}")
        return self._stream(chat_messages(messages), recall, dict(options))

    def _recall_for(self, scope, messages, budget, filters):
        from .runtime.chat import chat_messages

        msgs = chat_messages(messages)
        query = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), None)
        if query is None:
            raise InvalidInput("messages have no user message to answer")
        return msgs, self.read(scope, query, budget, filters)

    def _stream(self, msgs, recall, options) -> Iterator[str]:
        caller = options.pop("on_prefill", None)

        def prefill(tokens: int, seconds: float) -> None:
            if tokens >= 16:  # shorter prompts measure mostly overhead
                self.measure("model", "prefill_ms_per_token", 1000 * seconds / tokens)
            if caller is not None:
                caller(tokens, seconds)
        return self.model.stream(msgs, recall, on_prefill=prefill, **options)

    def feedback(self, scope: Scope | str, item_ids: Iterable[int], used: bool = True) -> None:
        """Report which returned items the answer actually used (feeds the policies)."""
        scope = Scope.of(scope)
        ids = check_ids(item_ids)
        if not isinstance(used, bool):
            raise InvalidInput(f"used must be True or False, got {used!r}")
        if not used or not ids:
            return
        with self.store.scoped(scope) as db:
            self._owned_ids(db, scope, ids, visible=True)
            record_feedback(db, ids)

    def inspect(self, scope: Scope | str, limit: int = 200) -> list[dict[str, Any]]:
        """Where each item of ``scope`` (and the scopes under it) sits: its level, usage, the
        bytes each tier keeps for it, and the history of its placements with their reasons."""
        scope = Scope.of(scope)
        limit = check_count(limit, "limit")
        usage = {u.item_id: u for u in self.usage(scope, subtree=True)}
        ids = sorted(usage)[-limit:] if limit else sorted(usage)
        with self.store.scoped(scope) as db:
            texts = dict(db.execute("SELECT id, text FROM items WHERE id = ANY(%s::bigint[])", (ids,)).fetchall())
            history: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
            for item_id, tier, level, held, reason, at in db.execute(
                    "SELECT item_id, tier, level, held, reason, at FROM moves WHERE item_id = ANY(%s::bigint[]) "
                    "ORDER BY at, id", (ids,)).fetchall():
                history[item_id].append({"tier": tier, "level": level, "held": held, "reason": reason, "at": at})
            # Each implementation is called on its own: the answer is labelled with its plugin's name.
            footprint: dict[int, dict[str, int]] = {i: {} for i in ids}
            # As pluggy does: an implementation may declare only some of the hook's arguments.
            offered = {"memory": self, "item_ids": ids, "db": db}
            for impl in self.hook.memplug_footprint.get_hookimpls():
                name = getattr(impl.plugin, "name", None) or impl.plugin_name
                answer = impl.function(**{a: offered[a] for a in impl.argnames})
                for item_id, size in (answer or {}).items():
                    footprint[item_id][name] = int(size)
        return [{"id": i, "text": texts.get(i, ""), "level": usage[i].level, "reads": usage[i].reads,
                 "used": usage[i].used, "heat": usage[i].heat, "last_read_at": usage[i].last_read_at,
                 "tokens": usage[i].tokens, "bytes": footprint[i], "history": history[i]} for i in ids]

    # -- costs ---------------------------------------------------------------

    def measure(self, tier: str, metric: str, value: float, db: psycopg.Connection | None = None) -> None:
        """Fold one measurement of a tier's cost into its running mean (the last ~20 samples count).

        Kept in Postgres (``tier_costs``), so every process and worker of a
        deployment shares them. With ``db`` the sample is written in the caller's
        transaction, and the shared row stays locked until that transaction ends (the
        built-in tiers never pass a consolidation's: it can last an adapter's training);
        without, it is buffered and written every 20 samples (reads measure often and
        should not pay a write each), at consolidation and on close.
        """
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(f"measurement {tier}/{metric} must be a finite number >= 0, got {value!r}")
        if db is not None:
            _fold_costs(db, [(tier, metric, value, 1)])
            return
        with self._measure_lock:
            total, n = self._pending_costs.get((tier, metric), (0.0, 0))
            self._pending_costs[(tier, metric)] = (total + value, n + 1)
            full = n + 1 >= 20
        if full:
            self.flush_measurements()

    def flush_measurements(self) -> None:
        """Write buffered measurements now."""
        with self._measure_lock:
            pending, self._pending_costs = self._pending_costs, {}
        if pending:
            with self.store.transaction() as db:
                _fold_costs(db, [(t, m, total / n, n) for (t, m), (total, n) in sorted(pending.items())])

    def measured(self, tier: str) -> dict[str, tuple[float, int]]:
        """A tier's measured costs: ``{metric: (mean, samples)}``."""
        self.flush_measurements()
        with self.store.transaction() as db:
            rows = db.execute("SELECT metric, value, samples FROM tier_costs WHERE tier = %s", (tier,)).fetchall()
        return {r[0]: (float(r[1]), int(r[2])) for r in rows}

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

            opt = self.settings.option
            self._jobs = JobQueue(self, attempts=opt("job_attempts", 3, int),
                                  retry_wait_s=opt("job_retry_wait_s", 5.0, float),
                                  stalled_s=opt("job_stalled_s", 30.0, float))
        return self._jobs

    @overload
    def consolidate(self, scope: Scope | str, moves: Iterable[Move] | None = ..., *, wait: Literal[False] = ...,
                    progress: Callable[[str, int, int, Mapping[str, Any]], None] | None = ...) -> int: ...
    @overload
    def consolidate(self, scope: Scope | str, moves: Iterable[Move] | None = ..., *, wait: Literal[True],
                    progress: Callable[[str, int, int, Mapping[str, Any]], None] | None = ...) -> list[Placement]: ...
    def consolidate(self, scope, moves=None, *, wait=False, progress=None):
        """Move knowledge between levels: enqueue a job (``memplug worker`` runs it) and return
        its id, or with ``wait=True`` do it now and return the placements the tiers reported.

        Without ``moves`` the policies plan them from usage when the job runs.
        Covers the items of ``scope`` and every scope under it; the moves are
        applied in one transaction. ``progress(task, done, total, info)`` hears
        about long work (training an adapter) when run inline.
        """
        if not isinstance(wait, bool):
            raise InvalidInput(f"wait must be True or False, got {wait!r}")
        scope = Scope.of(scope)
        if moves is not None:
            moves = list(moves)
            if not all(isinstance(m, Move) for m in moves):
                raise InvalidInput("moves must be memplug.Move values")
        if not wait:
            if moves:
                with self.store.scoped(scope) as db:  # refuse foreign items now, not in the worker
                    self._owned_ids(db, scope, sorted({i for m in moves for i in m.item_ids}), visible=False)
            # The levels are checked where the job runs: a worker may load tiers this process lacks.
            return self.jobs.enqueue(scope, moves)
        if moves is not None:  # a policy's plan may name a level no installed tier holds (weights without lora): it idles
            self._check_moves(moves)
        return self._consolidate_now(scope, moves, progress)

    def _consolidate_now(self, scope: Scope, moves: list[Move] | None,
                         progress: Callable[[str, int, int, Mapping[str, Any]], None] | None) -> list[Placement]:
        self.flush_measurements()
        if moves is None:
            usage = self.usage(scope, subtree=True)
            moves = _first_move_per_item(_flatten(self.hook.memplug_plan(memory=self, scope=scope, usage=usage)))
        if not moves:
            return []
        with self.store.scoped(scope) as db:
            self._owned_ids(db, scope, sorted({i for m in moves for i in m.item_ids}), visible=False)
            placed = _flatten(self.hook.memplug_consolidate(memory=self, scope=scope, moves=moves, db=db,
                                                            progress=progress))
            self._apply_placements(db, placed, {i: m.reason for m in moves for i in m.item_ids})
        return placed

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
        return self._consolidate_now(scope, [Move(tuple(ids), 0, 1, "session ended")], None)

    def _apply_placements(self, db: psycopg.Connection, placed: Sequence[Placement],
                          why: Mapping[int, str] | None = None) -> None:
        """Record what the tiers report; ``why`` gives the reason of the move behind each item."""
        for p in placed:
            if not isinstance(p, Placement):
                raise InvalidInput(f"a hook returned {type(p).__name__} where a memplug.Placement was expected")
            if not p.item_ids:
                continue
            # The history of every placement, for `memplug inspect` (items gone in this transaction are
            # skipped): the planned move's reason, then what the tier did.
            groups: dict[str, list[int]] = {}
            for i in p.item_ids:
                move = (why or {}).get(i)
                groups.setdefault(f"{move}: {p.reason}" if move and move != p.reason else p.reason, []).append(i)
            for reason, ids in groups.items():
                db.execute(
                    "INSERT INTO moves (item_id, tier, level, held, reason) "
                    "SELECT i.id, %s, %s, %s, %s FROM items i WHERE i.id = ANY(%s::bigint[])",
                    (p.tier, p.level, p.held, reason, ids),
                )
            if p.held:
                # Joined with items: an item the tier replaced in the same transaction is skipped.
                db.execute(
                    """
                    INSERT INTO placements (item_id, tier, level, reason)
                    SELECT i.id, %s, %s, %s FROM items i WHERE i.id = ANY(%s::bigint[])
                    ON CONFLICT (item_id, tier) DO UPDATE SET level = EXCLUDED.level,
                        reason = EXCLUDED.reason, placed_at = now()
                    """,
                    (p.tier, p.level, p.reason, list(p.item_ids)),
                )
            else:
                db.execute(
                    "DELETE FROM placements WHERE tier = %s AND item_id = ANY(%s::bigint[])",
                    (p.tier, list(p.item_ids)),
                )

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
                ids = self._owned_ids(db, scope, check_ids(item_ids), visible=False)
            self.forget_in(db, scope, ids)
        return len(ids)

    def forget_in(self, db: psycopg.Connection, scope: Scope, item_ids: Sequence[int]) -> None:
        """Forget ``item_ids`` inside the caller's transaction (ids already checked)."""
        if not item_ids:
            return
        self.hook.memplug_forget(memory=self, scope=scope, item_ids=list(item_ids), db=db)
        db.execute("DELETE FROM items WHERE id = ANY(%s::bigint[])", (list(item_ids),))

    def _check_moves(self, moves: Sequence[Move]) -> None:
        """Refuse a requested move that no tier can make: up to a level no registered tier holds,
        or down from one. Which items a tier then takes or lets go is the tier's business (a tier
        may track items it declined, as the lora tier does, and let them go on a move down)."""
        levels = {p.level: p.name for p in self.plugins.tiers()}
        held = "; ".join(f"{n} {lv}" for lv, n in sorted(levels.items())) or "none"
        for m in moves:
            what, level = ("to", m.dst_level) if m.dst_level > m.src_level else ("from", m.src_level)
            if level not in levels:
                raise InvalidInput(f"cannot move items {what} level {level}: no tier holds it "
                                   f"(tiers by level: {held}); nothing was changed")

    def _owned_ids(self, db: psycopg.Connection, scope: Scope, ids: list[int], visible: bool) -> list[int]:
        where, params = (visible_sql if visible else subtree_sql)(scope, "i")
        rows = db.execute(
            f"SELECT i.id FROM items i WHERE i.id = ANY(%(ids)s::bigint[]) AND {where}", {**params, "ids": ids}
        ).fetchall()
        missing = sorted(set(ids) - {r[0] for r in rows})
        if missing:
            raise NotFound(f"item id(s) {missing} not found in scope {scope}; nothing was changed")
        return ids

    # -- inspection ----------------------------------------------------------

    def get(self, scope: Scope | str, item_ids: Iterable[int]) -> list[Item]:
        """The items with these ids, if the scope can see them."""
        scope = Scope.of(scope)
        ids = check_ids(item_ids)
        where, params = visible_sql(scope, "i")
        with self.store.scoped(scope) as db:
            self._owned_ids(db, scope, ids, visible=True)
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
        """Counts: items, scopes, turns, items per tier, usage, database size."""
        where, params = ("TRUE", {}) if scope is None else subtree_sql(Scope.of(scope), "i")
        # The whole store's counts span users: the unscoped path, as the tables' owner.
        with self.store.transaction() if scope is None else self.store.scoped(scope) as db:
            items, turns, users, scopes, chars = db.execute(
                f"SELECT count(*), count(i.role), count(DISTINCT i.user_id), "
                f"count(DISTINCT (i.user_id, i.agent_id, i.session_id)), coalesce(sum(length(i.text)), 0) "
                f"FROM items i WHERE {where}", params).fetchone()
            tiers = dict(db.execute(
                f"SELECT p.tier, count(*) FROM placements p JOIN items i ON i.id = p.item_id WHERE {where} "
                f"GROUP BY p.tier ORDER BY p.tier", params).fetchall())
            reads = db.execute(
                f"SELECT coalesce(sum(u.reads), 0) FROM usage u JOIN items i ON i.id = u.item_id WHERE {where}",
                params).fetchone()[0]
            size = db.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        return {
            "scope": None if scope is None else str(Scope.of(scope)),
            "items": items, "turns": turns, "users": users, "scopes": scopes, "text_chars": chars,
            "items_per_tier": tiers, "reads": int(reads), "database_bytes": size,
            "store": self.store.safe_dsn,
        }

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
        return await asyncio.to_thread(functools.partial(self.consolidate, *args, **kwargs))

    async def afeedback(self, *args: Any, **kwargs: Any) -> None:
        return await asyncio.to_thread(functools.partial(self.feedback, *args, **kwargs))


def _fold_costs(db: psycopg.Connection, samples: Sequence[tuple[str, str, float, int]]) -> None:
    """Running means over about the last 20 samples: ``(tier, metric, mean, count)`` rows."""
    for tier, metric, mean, count in samples:
        db.execute(
            """
            INSERT INTO tier_costs AS t (tier, metric, value, samples) VALUES (%(t)s, %(m)s, %(v)s, %(n)s)
            ON CONFLICT (tier, metric) DO UPDATE SET
                value = t.value + (EXCLUDED.value - t.value)
                        * least(1.0, EXCLUDED.samples::float / least(t.samples + EXCLUDED.samples, 20)),
                samples = t.samples + EXCLUDED.samples, at = now()
            """,
            {"t": tier, "m": metric, "v": mean, "n": count},
        )


def _content_hash(text: str, role: str | None, key: str | None = None) -> bytes:
    if key is not None:  # keyed items are told apart by their key, even with the same text
        return hashlib.sha256(f"key\0{key}\0{text}".encode()).digest()
    if role is None:
        return hashlib.sha256(text.encode()).digest()
    # Turns are events: the same words said twice are two turns.
    return hashlib.sha256(f"{role}\0{text}\0{uuid.uuid4()}".encode()).digest()


def _first_move_per_item(moves: Sequence[Move]) -> list[Move]:
    seen: set[int] = set()
    out = []
    for m in moves:
        if not isinstance(m, Move):
            raise InvalidInput(f"a memplug_plan hook returned {type(m).__name__}, not a memplug.Move")
        ids = tuple(i for i in m.item_ids if i not in seen)
        if ids:
            seen.update(ids)
            out.append(m if ids == m.item_ids else replace(m, item_ids=ids))
    return out
