"""Tier ``kv`` (level 2): explicit memory, the precomputed attention key/values of hot items.

When consolidation promotes an item to level 2, the local model reads a fixed
preamble followed by the item; the item's keys and values (every layer) are kept,
its keys rotated back to position 0 and compressed (int4 by default, see
:mod:`memplug_kv.codec`). Each consolidation writes one **pack** per scope it
touched to the artifact store: every item the scope holds at level 2, the new
ones encoded and the others copied as stored. Postgres keeps the index: item,
scope, embedding, span, pack key and first token, bytes, model fingerprint.
Forgetting or demoting an item rewrites its pack without it.

On read, the scope's level-2 items closest to the query (cosine, above
``kv_min_similarity``) are offered as one :class:`memplug.KVPrefix`, up to
``Budget.kv_tokens`` positions and ``kv_max_items`` items. The host then leaves
them out of the text hits; :mod:`memplug.runtime` injects them into attention,
de-quantizing and re-rotating them on the model's device (``kv_recompute``
reads the first tokens of each again in context). Loading a pack is one read
and one checksum; the packs read last stay resident on the model's device.
A pack whose fingerprint is not the loaded model's is never offered, and the
next consolidation re-encodes its items; so are those of a pack found damaged
on load by any process (the finding is kept in ``kv_items``, not in the
process that made it). Encoding lives in :mod:`memplug_kv.encode`, the pack
format in :mod:`memplug_kv.codec`.

Before an item is placed, its KV is **checked**: the local model is asked what
it knows about the item's subject, its answer begun with the item up to the
item's key word, once with the item as text and once with its decoded KV
injected. An item whose KV does not lead to its key word where its text does
stays text; the verdict is kept per model and codec, so the check is not
repeated at every consolidation. It is off by default (``kv_verify``): with
int4 on the policy benchmark's 200 facts it kept 2 items as text and made
promotion 5.6 times slower (56 s against 9.9 s). It is meant for lossier
settings (``kv_keep`` below 1, new codecs, another model).

Its options are declared in :data:`KVTier.options` (``memplug options`` lists them).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections import OrderedDict, defaultdict

import numpy as np
from psycopg.types.json import Jsonb

from memplug.plugin import (
    ITEM_COLUMNS,
    ITEM_WIDTH,
    ArtifactCorrupt,
    KVPrefix,
    ModelMismatch,
    Move,
    Option,
    Placement,
    Scope,
    TierCost,
    flag,
    hookimpl,
    item_from_row,
    row_security,
    subtree_sql,
    visible_sql,
)

from .codec import CODECS, Codec, compress, header, parse, serialize

log = logging.getLogger(__name__)
# Costs before anything was measured here (SmolLM2-135M on 2 CPU cores, int4; benchmarks/results/kv.json).
COST_PRIORS = {"read_ms_per_token": 0.05, "inject_ms_per_token": 0.05, "write_ms_per_token": 2.0,
               "bytes_per_token": 7244.0}
DIM = 384
MIGRATIONS = (
    f"""
    CREATE TABLE kv_items (
        item_id       bigint PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
        user_id       text NOT NULL,
        agent_id      text NOT NULL,
        session_id    text NOT NULL,
        embedding     halfvec({DIM}) NOT NULL,
        span          integer NOT NULL,
        stored_tokens integer NOT NULL,
        bytes         integer NOT NULL,
        fingerprint   text NOT NULL,
        codec         text NOT NULL,
        artifact      text NOT NULL,
        encoded_at    timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX kv_items_scope ON kv_items (user_id, agent_id, session_id);
    """,
    # 2: a scoped transaction sees its own user's blobs only
    row_security("kv_items"),
    # 3: items whose KV answers were found worse than their text answers, per model and codec
    """
    CREATE TABLE kv_refused (
        item_id     bigint PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
        user_id     text NOT NULL,
        fingerprint text NOT NULL,
        codec       text NOT NULL,
        text_score  integer NOT NULL,
        kv_score    integer NOT NULL,
        checked_at  timestamptz NOT NULL DEFAULT now()
    );
    """,
    row_security("kv_refused"),
    # 4: a blob found damaged on load, by any process: never offered again, re-encoded at the next consolidation
    "ALTER TABLE kv_items ADD COLUMN damaged boolean NOT NULL DEFAULT false;",
    # 5: a scope's items share one pack; an item owns stored tokens token_start .. + stored_tokens of it
    """
    ALTER TABLE kv_items ADD COLUMN token_start integer NOT NULL DEFAULT 0;
    CREATE INDEX kv_items_artifact ON kv_items (artifact);
    """,
)
REFUSED = "stays text: its KV answers recall less than its text answers"


class KVTier:
    """Explicit memory: compressed attention key/values, injected into the local model."""

    name = "kv"
    level = 2
    needs_backend = ("kv",)  # a serving engine that takes no injected KV (vllm) leaves this tier out
    options = (
        Option("kv_codec", str, "int4", "How KV is compressed: fp16 and bf16 cast, int8 to int2 quantize "
               "with a scale and minimum per group of channels.", choices=CODECS),
        Option("kv_group", int, 32, "Channels per quantization scale (a power of two).", min=2),
        Option("kv_keep", float, 1.0, "Fraction of each item's tokens stored (token selection below 1).",
               gt=0, max=1),
        Option("kv_max_items", int, 16, "Items one read injects at most.", min=1),
        Option("kv_min_similarity", float, 0.1, "Cosine similarity to the query an item needs to be injected.",
               min=-1, max=1),
        Option("kv_margin", float, 0.1, "An item less similar to the query than the best one by more than this "
               "is left out, neither injected nor served as text.", min=0),
        Option("kv_max_item_tokens", int, 512, "Longer items stay text.", min=1),
        Option("kv_cache_mb", int, 256, "Megabytes of hot packs kept resident on the model's device, "
               "compressed as stored.", min=0),
        Option("kv_recompute", int, 0, "Tokens at the start of each injected item read again with attention "
               "to the items before it (0: none).", min=0),
        Option("kv_verify", flag, False, "Before placing an item, check that its decoded KV leads the model to "
               "the item's key word where its text does; items that fail stay text.", metavar="bool"),
    )

    @hookimpl
    def memplug_configure(self, memory):
        memory.store.migrate("kv", MIGRATIONS)
        self.codec = Codec(memory.option("kv_codec"), memory.option("kv_group"), memory.option("kv_keep"))
        self.max_items = memory.option("kv_max_items")
        self.min_similarity = memory.option("kv_min_similarity")
        self.max_item_tokens = memory.option("kv_max_item_tokens")
        self.verify = memory.option("kv_verify")
        self.margin = memory.option("kv_margin")
        self.recompute = memory.option("kv_recompute")
        self._packs = _PackCache(memory.option("kv_cache_mb") << 20)

    # -- consolidation --------------------------------------------------------

    @hookimpl
    def memplug_plan(self, memory, scope, usage):
        """Re-encode items whose KV was made by another model, or whose pack was found damaged on load."""
        where, params = subtree_sql(scope, "k")
        with memory.store.scoped(scope) as db:
            if not db.execute(f"SELECT EXISTS (SELECT 1 FROM kv_items k WHERE {where})", params).fetchone()[0]:
                return None
            params["fp"] = memory.model_fingerprint
            ids = [r[0] for r in db.execute(
                f"SELECT k.item_id FROM kv_items k WHERE {where} "
                f"AND (k.fingerprint <> %(fp)s OR k.damaged) ORDER BY k.item_id",
                params).fetchall()]
        return [Move(tuple(ids), 1, self.level, "re-encode for the loaded model")] if ids else None

    @hookimpl
    def memplug_consolidate(self, memory, scope, moves, db):
        up = sorted({i for m in moves if m.dst_level == self.level for i in m.item_ids})
        down = sorted({i for m in moves if m.src_level == self.level and m.dst_level < self.level
                       for i in m.item_ids})
        done = []
        if up or down:
            # One change to a user's packs at a time (consolidations and forgets), so that a pack is
            # never rewritten from a version another has replaced, nor swept before it commits.
            _lock(db, [scope.user_id])
        if up:
            encoded, refused, replaced = self._encode(memory, db, up)
            if encoded:
                done.append(Placement(self.name, self.level, encoded, "encoded"))
            if refused:
                done.append(Placement(self.name, self.level, refused, REFUSED, held=False))
            self._sweep(memory, db, scope.user_id, replaced)
        if down:
            dropped = self._drop(memory, db, down)  # only those it held: the others' history stays as it is
            if dropped:
                done.append(Placement(self.name, self.level, dropped, "demoted", held=False))
        return done

    def _sweep(self, memory, db, user_id, pending=frozenset()):
        """Delete the user's packs that no row names: written by a consolidation that died before its
        commit (a killed worker), half-written temporary files included. ``pending`` are packs this
        transaction replaced, deleted when it commits. Runs under the user's kv lock."""
        folder = f"kv/{memory.model_fingerprint[:16]}/{user_id}"
        named = {r[0] for r in db.execute("SELECT artifact FROM kv_items WHERE user_id = %s", (user_id,))}
        for key in memory.artifacts.list(folder):
            if key not in named and key not in pending:
                log.info("kv: removing %s, left by a consolidation that never committed", key)
                memory.artifacts.delete(key)

    def _encode(self, memory, db, ids):
        started = time.perf_counter()
        rows = db.execute(f"SELECT {ITEM_COLUMNS} FROM items i WHERE i.id = ANY(%s::bigint[]) ORDER BY i.id",
                          (ids,)).fetchall()
        items = [item_from_row(r) for r in rows]
        model = memory.model
        fits = [it for it in items if len(model.chunk_ids(it.text)) <= self.max_item_tokens]
        if len(fits) < len(items):
            log.info("kv: %d item(s) longer than kv_max_item_tokens=%d stay text-only",
                     len(items) - len(fits), self.max_item_tokens)
        refused_before = {r[0] for r in db.execute(
            "SELECT item_id FROM kv_refused WHERE item_id = ANY(%s::bigint[]) AND fingerprint = %s AND codec = %s",
            ([it.id for it in fits], model.fingerprint, self.codec.label)).fetchall()} if self.verify else set()
        fits = [it for it in fits if it.id not in refused_before]
        if not fits:
            return [], [], set()
        from .encode import verify

        chunks = self._chunks(model, [it.text for it in fits], [it.id for it in fits])
        refused = []
        if self.verify:
            # What a reader gets back: the pack decoded, quantization error included.
            served = compress(chunks, self.codec).chunks()
            keep = []
            for k, (t, v) in enumerate(verify(model, [it.text for it in fits], served)):
                if v >= t:
                    keep.append(k)
                else:
                    it = fits[k]
                    refused.append(it.id)
                    db.execute(
                        """
                        INSERT INTO kv_refused (item_id, user_id, fingerprint, codec, text_score, kv_score)
                        VALUES (%s, %s, %s, %s, %s, %s)
                        ON CONFLICT (item_id) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,
                            codec = EXCLUDED.codec, text_score = EXCLUDED.text_score,
                            kv_score = EXCLUDED.kv_score, checked_at = now()
                        """, (it.id, it.scope.user_id, model.fingerprint, self.codec.label, t, v))
            if refused:
                log.info("kv: %d of %d item(s) stay text: their KV answers recall less than their text answers",
                         len(refused), len(fits))
            fits, chunks = [fits[k] for k in keep], [chunks[k] for k in keep]
        if not fits:
            return [], refused, set()
        if not fits:
            return [], refused, set()
        vectors = memory.embedder.encode([it.text for it in fits])
        replaced = self._repack(memory, db, model, fits, chunks, vectors, started)
        return [it.id for it in fits], refused, replaced

    def _chunks(self, model, texts, ids):
        from .encode import encode, thin

        return [thin(c, self.codec.keep) for c in encode(model, texts, ids, scores=self.codec.keep < 1.0)]

    def _repack(self, memory, db, model, items, chunks, vectors, started) -> set[str]:
        """Write one pack per scope of ``items``: its fresh ``chunks`` and every item the scope already
        holds (copied as stored; re-encoded where its pack is damaged or of another codec). The packs
        it replaces are deleted when the transaction commits; returns their keys."""
        fp, layout = model.fingerprint, _layout(model)
        fresh = {it.id: (it, chunk, vec) for it, chunk, vec in zip(items, chunks, vectors, strict=True)}
        replaced = {r[0] for r in db.execute("SELECT DISTINCT artifact FROM kv_items WHERE item_id = ANY(%s)",
                                             (list(fresh),))}
        by_scope = defaultdict(list)
        for it in items:
            by_scope[it.scope.key].append(it.id)
        stored = spans = 0
        for (u, a, s), ids in sorted(by_scope.items()):
            held = db.execute(
                """
                SELECT artifact, array_agg(item_id ORDER BY token_start, item_id), min(codec), max(codec)
                FROM kv_items WHERE user_id = %s AND agent_id = %s AND session_id = %s AND fingerprint = %s
                  AND NOT damaged AND item_id <> ALL(%s) GROUP BY artifact ORDER BY artifact
                """, (u, a, s, fp, ids)).fetchall()
            parts, again = [], []
            for key, held_ids, low, high in held:
                replaced.add(key)
                try:
                    if low != self.codec.label or high != self.codec.label:
                        raise ModelMismatch(f"encoded as {low}, not {self.codec.label}")
                    pack = parse(memory.artifacts.get(key), fingerprint=fp, layout=layout,
                                 where=memory.artifacts.uri(key))
                    parts.append(pack.select(held_ids))
                except (ArtifactCorrupt, ModelMismatch, KeyError) as e:
                    log.info("kv: re-encoding %d item(s) of %s: %s", len(held_ids), key, e)
                    again += held_ids
            if again:
                rows = db.execute(f"SELECT {ITEM_COLUMNS} FROM items i WHERE i.id = ANY(%s::bigint[]) "
                                  f"ORDER BY i.id", (again,)).fetchall()
                texts = [item_from_row(r) for r in rows]
                parts.append(compress(self._chunks(model, [t.text for t in texts], [t.id for t in texts]),
                                      self.codec))
            parts.append(compress([fresh[i][1] for i in ids], self.codec))
            pack = _concat(parts)
            data = serialize(pack, fp, layout, self.codec.keep)
            key = f"kv/{fp[:16]}/{u}/{a or '_'}/{s or '_'}/pack-{uuid.uuid4().hex[:16]}.safetensors"
            memory.artifacts.put(key, data)
            memory.store.on_rollback(db, functools.partial(memory.artifacts.delete, key))
            for item_id, begin, count, span in zip(pack.item_ids, pack.starts, pack.counts, pack.spans, strict=True):
                size = round(len(data) * count / pack.tokens)
                if item_id not in fresh:
                    db.execute("UPDATE kv_items SET artifact = %s, token_start = %s, stored_tokens = %s, bytes = %s, "
                               "codec = %s, damaged = false WHERE item_id = %s",
                               (key, begin, count, size, self.codec.label, item_id))
                    continue
                db.execute(
                    """
                    INSERT INTO kv_items (item_id, user_id, agent_id, session_id, embedding, span, stored_tokens,
                                          bytes, fingerprint, codec, artifact, token_start)
                    VALUES (%s, %s, %s, %s, %s::halfvec, %s, %s, %s, %s, %s, %s, %s)
                    ON CONFLICT (item_id) DO UPDATE SET embedding = EXCLUDED.embedding, span = EXCLUDED.span,
                        stored_tokens = EXCLUDED.stored_tokens, bytes = EXCLUDED.bytes,
                        fingerprint = EXCLUDED.fingerprint, codec = EXCLUDED.codec, artifact = EXCLUDED.artifact,
                        token_start = EXCLUDED.token_start, encoded_at = now(), damaged = false
                    """,
                    (item_id, u, a, s, np.asarray(fresh[item_id][2], dtype=np.float32), span, count, size, fp,
                     self.codec.label, key, begin),
                )
                stored += size
                spans += span
        self._retire(memory, db, replaced)
        if spans:
            # Buffered, not written in the consolidation's transaction: the shared cost rows would
            # stay locked to its end, which can be an adapter's training minutes later.
            memory.measure(self.name, "write_ms_per_token", 1000 * (time.perf_counter() - started) / spans)
            memory.measure(self.name, "bytes_per_token", stored / spans)
        return replaced

    def _retire(self, memory, db, keys) -> None:
        """Delete, when the transaction commits, the packs among ``keys`` that no row names any more."""
        keys = sorted(keys)
        named = {r[0] for r in db.execute("SELECT DISTINCT artifact FROM kv_items WHERE artifact = ANY(%s)",
                                          (keys,))}
        for key in keys:
            self._packs.drop(key)
            if key not in named:
                memory.store.on_commit(db, functools.partial(memory.artifacts.delete, key))

    def _drop(self, memory, db, ids) -> list[int]:
        """Let go of these items' KV entries; returns the ids it held. Each pack that held one is
        rewritten without it (no byte of it stays in the store) or, if nothing is left, deleted."""
        # The users of the items themselves, not of their kv rows: a consolidation holding the lock
        # may be adding rows this transaction cannot see yet, and must finish before these are looked for.
        users = [r[0] for r in db.execute("SELECT DISTINCT user_id FROM items WHERE id = ANY(%s::bigint[])",
                                          (ids,)).fetchall()]
        if not users:
            return []
        _lock(db, users)
        rows = db.execute("DELETE FROM kv_items WHERE item_id = ANY(%s::bigint[]) RETURNING item_id, artifact",
                          (ids,)).fetchall()
        touched = sorted({key for _, key in rows})
        for key in touched:
            left = [r[0] for r in db.execute(
                "SELECT item_id FROM kv_items WHERE artifact = %s ORDER BY token_start, item_id", (key,))]
            if left:
                self._rewrite(memory, db, key, left)
        self._retire(memory, db, touched)
        return sorted(r[0] for r in rows)

    def _rewrite(self, memory, db, key, left) -> None:
        """Write pack ``key`` again with only the items ``left`` (as stored; no model needed)."""
        where = memory.artifacts.uri(key)
        try:
            data = memory.artifacts.get(key)
            pack = parse(data, fingerprint=None, layout=None, where=where).select(left)
            meta = header(data)
            layout = {k: int(meta[k]) for k in ("layers", "kv_heads", "head_dim")}
            fingerprint, keep = meta["fingerprint"], float(meta.get("keep", "1.0"))
        except (ArtifactCorrupt, KeyError, ValueError) as e:
            # Unreadable: the file goes anyway (it may still hold what was forgotten); the items left
            # are served as text and re-encoded from it at the next consolidation.
            log.warning("kv: %s cannot be rewritten (%s); its %d other item(s) are re-encoded at the next "
                        "consolidation", where, type(e).__name__, len(left))
            db.execute("UPDATE kv_items SET damaged = true WHERE artifact = %s", (key,))
            memory.store.on_commit(db, functools.partial(memory.artifacts.delete, key))
            return
        new = serialize(pack, fingerprint, layout, keep)
        folder, _, _ = key.rpartition("/")
        fresh = f"{folder}/pack-{uuid.uuid4().hex[:16]}.safetensors"
        memory.artifacts.put(fresh, new)
        memory.store.on_rollback(db, functools.partial(memory.artifacts.delete, fresh))
        for item_id, begin, count in zip(pack.item_ids, pack.starts, pack.counts, strict=True):
            db.execute("UPDATE kv_items SET artifact = %s, token_start = %s, bytes = %s WHERE item_id = %s",
                       (fresh, begin, round(len(new) * count / pack.tokens), item_id))

    # -- read -------------------------------------------------------------------

    @hookimpl
    def memplug_read(self, memory, scope, query, budget, filters, db):
        where, params = visible_sql(scope, "k")
        if not db.execute(f"SELECT EXISTS (SELECT 1 FROM kv_items k WHERE {where})", params).fetchone()[0]:
            return None
        if filters:
            where += " AND i.metadata @> %(filters)s"
            params["filters"] = Jsonb(filters)
        params.update(vec=memory.embedder.encode([query])[0], n=self.max_items, floor=self.min_similarity)
        rows = db.execute(
            f"""
            SELECT {ITEM_COLUMNS}, k.span, k.artifact, k.fingerprint, k.codec, k.bytes,
                   1 - (k.embedding <=> %(vec)s::halfvec) AS similarity
            FROM kv_items k JOIN items i ON i.id = k.item_id
            WHERE {where} AND NOT k.damaged AND 1 - (k.embedding <=> %(vec)s::halfvec) >= %(floor)s
            ORDER BY k.embedding <=> %(vec)s::halfvec, k.item_id LIMIT %(n)s
            """,
            params,
        ).fetchall()
        if not rows:
            return None
        fingerprint = memory.model_fingerprint
        # Chunks encoded apart are told apart worse than text: a near miss injected next to the item
        # that answers misleads the model. Items far less similar than the best are left out.
        best = float(rows[0][-1])
        near = [float(r[-1]) >= best - self.margin for r in rows]
        left_out = tuple(r[0] for r, ok in zip(rows, near, strict=True) if not ok)
        rows = [r for r, ok in zip(rows, near, strict=True) if ok]
        chosen, spent = [], 0
        for r in rows:
            span, key, fp, codec, size = r[ITEM_WIDTH:ITEM_WIDTH + 5]
            if fp != fingerprint:
                log.warning("kv: item %s was encoded by another model (%s); served as text until re-encoded",
                            r[0], fp)
                continue
            if spent + span > budget.kv_tokens:
                continue
            chosen.append((item_from_row(r), key, codec, size, span))
            spent += span
        if not chosen:
            return None
        items = tuple(c[0] for c in chosen)
        codecs = sorted({c[2] for c in chosen})
        loader = functools.partial(self._load, memory, scope, {c[0].id: c[1] for c in chosen}, fingerprint)
        return [KVPrefix(self.name, items, spent, fingerprint, "+".join(codecs), loader,
                         sum(c[3] for c in chosen), spans=tuple(c[4] for c in chosen),
                         sizes=tuple(c[3] for c in chosen), left_out=left_out, recompute=self.recompute)]

    def _load(self, memory, scope, keys, fingerprint, item_ids):
        """The items' pack, on the model's device: one read and one checksum per pack not already
        resident there, then the items' tokens picked out; still compressed."""
        started = time.perf_counter()
        model = memory.model
        if model.fingerprint != fingerprint:
            raise ModelMismatch(f"this KV prefix was built for model {fingerprint}, "
                                f"the loaded model is {model.fingerprint}")
        layout = _layout(model)
        by_key = defaultdict(list)
        for i in item_ids:
            by_key[keys[i]].append(i)
        parts = []
        for key, ids in by_key.items():
            try:
                parts.append(self._resident(memory, key, fingerprint, layout, model.device, ids).select(ids))
            except ArtifactCorrupt:
                if memory.artifacts.exists(key):
                    self._damaged(memory, scope, key)
                    raise
                # Rewritten since the read (an item of its pack was forgotten or demoted): where are they now?
                for moved, moved_ids in self._current(memory, scope, ids).items():
                    if moved == key:  # still named, yet gone: lost from the store
                        self._damaged(memory, scope, key)
                        raise
                    parts.append(self._resident(memory, moved, fingerprint, layout, model.device,
                                                 moved_ids).select(moved_ids))
            except (ModelMismatch, KeyError) as e:
                self._damaged(memory, scope, key)
                raise ArtifactCorrupt(f"KV pack {memory.artifacts.uri(key)} does not hold items {ids} as "
                                      f"indexed ({e}); the next consolidation re-encodes them") from None
        pack = _concat(parts).select(item_ids)
        if pack.tokens:
            memory.measure(self.name, "read_ms_per_token", 1000 * (time.perf_counter() - started) / sum(pack.spans))
        return pack

    def _resident(self, memory, key, fingerprint, layout, device, ids):
        def load():
            return parse(memory.artifacts.get(key), fingerprint=fingerprint, layout=layout,
                         where=f"{memory.artifacts.uri(key)} (items {', '.join(map(str, ids))})").to(device)
        return self._packs.get(key, load)

    def _current(self, memory, scope, ids) -> dict[str, list[int]]:
        """Where the packs of these items are now, ``{pack key: item ids}``; a forgotten item is an error."""
        with memory.store.scoped(Scope(scope.user_id)) as db:
            found = dict(db.execute("SELECT item_id, artifact FROM kv_items WHERE item_id = ANY(%s::bigint[]) "
                                    "AND NOT damaged", (list(ids),)).fetchall())
        gone = [i for i in ids if i not in found]
        if gone:
            raise ArtifactCorrupt(f"the KV of items {gone} was dropped since they were read; read again")
        out = defaultdict(list)
        for i in ids:
            out[found[i]].append(i)
        return out

    def _damaged(self, memory, scope, key):
        """Record in Postgres that a pack failed to load: no process offers its items again, and the
        next consolidation, in whichever process or worker, re-encodes them."""
        self._packs.drop(key)
        try:
            with memory.store.scoped(Scope(scope.user_id)) as db:
                db.execute("UPDATE kv_items SET damaged = true WHERE artifact = %s", (key,))
        except Exception:  # noqa: BLE001 - the load's own error is the one to raise
            log.warning("kv: could not record %s as damaged", key, exc_info=True)

    @hookimpl
    def memplug_footprint(self, memory, item_ids, db):
        rows = db.execute("SELECT item_id, bytes FROM kv_items WHERE item_id = ANY(%s::bigint[])",
                          (list(item_ids),)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    @hookimpl
    def memplug_costs(self, memory, scope):
        """Reads: load a pack and place its items in the cache on the model's device (no prompt
        tokens); writes: encode; bytes per token. Until a read was measured, placing is timed once
        against reading the same tokens as text, on the model's own device."""
        m = memory.measured(self.name)
        if "inject_ms_per_token" not in m:
            model = memory.model
            calibrate = getattr(model, "injection_costs", None)
            if calibrate is not None and getattr(model, "can_inject", False):
                costs = calibrate()
                memory.measure(self.name, "inject_ms_per_token", costs["inject_ms_per_token"])
                memory.measure("model", "prefill_ms_per_token", costs["prefill_ms_per_token"])
                m = memory.measured(self.name)

        def get(metric):
            return m[metric][0] if metric in m else COST_PRIORS[metric]
        return TierCost(self.name, self.level, read_ms=0.0,
                        read_ms_per_token=get("read_ms_per_token") + get("inject_ms_per_token"),
                        write_ms_per_token=get("write_ms_per_token"),
                        bytes_per_token=get("bytes_per_token"),
                        samples=sum(n for _, n in m.values()))

    # -- forget -----------------------------------------------------------------

    @hookimpl
    def memplug_forget(self, memory, scope, item_ids, db):
        _lock(db, [scope.user_id])  # first: a consolidation of this user's packs finishes before
        self._drop(memory, db, list(item_ids))


def _lock(db, users) -> None:
    """Hold each user's kv lock to the end of the transaction (in one order: no deadlock)."""
    for user in sorted(set(users)):
        db.execute("SELECT pg_advisory_xact_lock(hashtext('memplug-kv'), hashtext(%s))", (user,))


def _concat(parts):
    """One pack of several (packs of different codecs are expanded to fp32 first)."""
    from memplug.runtime import PackedKV

    if len({(p.codec, p.group) for p in parts}) > 1:
        parts = [_expanded(p) for p in parts]
    return PackedKV.concat(parts)


def _expanded(pack):
    from dataclasses import replace

    keys, values = pack.dequantize()
    return replace(pack, codec="fp32", group=0, keys={"data": keys}, values={"data": values})


def _layout(model) -> dict[str, int]:
    return {"layers": model.layers, "kv_heads": model.kv_heads, "head_dim": model.head_dim}


class _PackCache:
    """Recently read packs, parsed and checked, resident on the model's device, up to a size in bytes.
    Readers get new tensors picked out of them (``select``): nothing a reader does reaches the cache."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._packs: OrderedDict[str, object] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key, load):
        with self._lock:
            pack = self._packs.get(key)
            if pack is not None:
                self._packs.move_to_end(key)
                return pack
        pack = load()
        if pack.nbytes <= self.max_bytes:
            with self._lock:
                if key not in self._packs:
                    self._packs[key] = pack
                    self._size += pack.nbytes
                while self._size > self.max_bytes:
                    _, old = self._packs.popitem(last=False)
                    self._size -= old.nbytes
        return pack

    def drop(self, key):
        with self._lock:
            old = self._packs.pop(key, None)
            if old is not None:
                self._size -= old.nbytes
