"""Tier ``kv`` (level 2): explicit memory, the precomputed attention key/values of hot items.

When consolidation promotes an item to level 2, the local model reads a fixed
preamble followed by the item; the item's keys and values (every layer) are kept,
its keys rotated back to position 0, compressed (int4 by default, see
:mod:`memplug_kv.codec`) and written as a safetensors blob to the artifact
store. Postgres keeps the index: item, scope, embedding, positions, bytes,
model fingerprint and blob key.

On read, the scope's level-2 items closest to the query (cosine, above
``kv_min_similarity``) are offered as one :class:`memplug.KVPrefix`, up to
``Budget.kv_tokens`` positions and ``kv_max_items`` items. The host then leaves
them out of the text hits; :mod:`memplug.runtime` injects them into attention.
A blob whose fingerprint is not the loaded model's is never offered, and the
next consolidation re-encodes it; so is a blob found damaged on load by any
process (the finding is kept in ``kv_items``, not in the process that made it).
Encoding lives in :mod:`memplug_kv.encode`, the blob format in :mod:`memplug_kv.codec`.

Before an item is placed, its blob is **checked**: the local model is asked what
it knows about the item's subject, its answer begun with the item up to the
item's key word, once with the item as text and once with the decoded blob
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
from collections import OrderedDict

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

from .codec import CODECS, Codec, decode
from .codec import encode as pack_blob

log = logging.getLogger(__name__)
# Costs before anything was measured here (SmolLM2-135M on 2 CPU cores, int4; benchmarks/results/kv.json).
COST_PRIORS = {"read_ms_per_token": 0.05, "write_ms_per_token": 2.0, "bytes_per_token": 7244.0}
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
        Option("kv_cache_mb", int, 256, "Megabytes of blobs kept in memory.", min=0),
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
        self._blobs = _BlobCache(memory.option("kv_cache_mb") << 20)

    # -- consolidation --------------------------------------------------------

    @hookimpl
    def memplug_plan(self, memory, scope, usage):
        """Re-encode blobs made by another model, or found damaged on load."""
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
        if up:
            # One encoding of a user's items at a time, so that the sweep never takes the blobs of
            # another that has not committed yet.
            db.execute("SELECT pg_advisory_xact_lock(hashtext('memplug-kv'), hashtext(%s))", (scope.user_id,))
            encoded, refused = self._encode(memory, db, up)
            if encoded:
                done.append(Placement(self.name, self.level, encoded, "encoded"))
            if refused:
                done.append(Placement(self.name, self.level, refused, REFUSED, held=False))
            self._sweep(memory, db, scope.user_id)
        if down:
            dropped = self._drop(memory, db, down)  # only those it held: the others' history stays as it is
            if dropped:
                done.append(Placement(self.name, self.level, dropped, "demoted", held=False))
        return done

    def _sweep(self, memory, db, user_id):
        """Delete the user's blobs that no row names: written by a consolidation that died before its
        commit (a killed worker), half-written temporary files included. Runs under the user's kv lock."""
        folder = f"kv/{memory.model_fingerprint[:16]}/{user_id}"
        named = {r[0] for r in db.execute("SELECT artifact FROM kv_items WHERE user_id = %s", (user_id,))}
        for key in memory.artifacts.list(folder):
            if key not in named:
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
            return [], []
        from .encode import encode, thin, verify

        layout = _layout(model)
        chunks = [thin(c, self.codec.keep) for c in
                  encode(model, [it.text for it in fits], [it.id for it in fits], scores=self.codec.keep < 1.0)]
        blobs = [pack_blob(chunk, self.codec, model.fingerprint, layout) for chunk in chunks]
        refused = []
        if self.verify:
            # What a reader gets back: the blob decoded, quantization error included.
            served = [decode(b, fingerprint=model.fingerprint, layout=layout, where=f"item {it.id} (check)")
                      for it, b in zip(fits, blobs, strict=True)]
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
            fits, blobs = [fits[k] for k in keep], [blobs[k] for k in keep]
            chunks = [chunks[k] for k in keep]
        if not fits:
            return [], refused
        vectors = memory.embedder.encode([it.text for it in fits])
        stored = spans = 0
        old = dict(db.execute("SELECT item_id, artifact FROM kv_items WHERE item_id = ANY(%s::bigint[])",
                              ([it.id for it in fits],)).fetchall())
        for it, chunk, blob, vec in zip(fits, chunks, blobs, vectors, strict=True):
            key = _artifact_key(model.fingerprint, it)
            memory.artifacts.put(key, blob)
            memory.store.on_rollback(db, functools.partial(memory.artifacts.delete, key))
            if old.get(it.id) not in (None, key):
                memory.store.on_commit(db, functools.partial(memory.artifacts.delete, old[it.id]))
            self._blobs.drop(key)
            u, a, s = it.scope.key
            db.execute(
                """
                INSERT INTO kv_items (item_id, user_id, agent_id, session_id, embedding, span, stored_tokens,
                                      bytes, fingerprint, codec, artifact)
                VALUES (%s, %s, %s, %s, %s::halfvec, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (item_id) DO UPDATE SET embedding = EXCLUDED.embedding, span = EXCLUDED.span,
                    stored_tokens = EXCLUDED.stored_tokens, bytes = EXCLUDED.bytes,
                    fingerprint = EXCLUDED.fingerprint, codec = EXCLUDED.codec, artifact = EXCLUDED.artifact,
                    encoded_at = now(), damaged = false
                """,
                (it.id, u, a, s, np.asarray(vec, dtype=np.float32), chunk.span, chunk.stored_tokens, len(blob),
                 model.fingerprint, self.codec.label, key),
            )
            stored += len(blob)
            spans += chunk.span
        if spans:
            # Buffered, not written in the consolidation's transaction: the shared cost rows would
            # stay locked to its end, which can be an adapter's training minutes later.
            memory.measure(self.name, "write_ms_per_token", 1000 * (time.perf_counter() - started) / spans)
            memory.measure(self.name, "bytes_per_token", stored / spans)
        return [it.id for it in fits], refused

    def _drop(self, memory, db, ids) -> list[int]:
        """Let go of these items' KV entries; returns the ids it held."""
        rows = db.execute(
            "DELETE FROM kv_items WHERE item_id = ANY(%s::bigint[]) RETURNING item_id, artifact", (ids,)).fetchall()
        for _, key in rows:
            self._blobs.drop(key)
            memory.store.on_commit(db, functools.partial(memory.artifacts.delete, key))
        return sorted(r[0] for r in rows)

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
                         sizes=tuple(c[3] for c in chosen), left_out=left_out)]

    def _load(self, memory, scope, keys, fingerprint, item_ids):
        started = time.perf_counter()
        entries = [(i, keys[i]) for i in item_ids]
        model = memory.model
        if model.fingerprint != fingerprint:
            raise ModelMismatch(f"this KV prefix was built for model {fingerprint}, "
                                f"the loaded model is {model.fingerprint}")
        layout = _layout(model)
        chunks = []
        for item_id, key in entries:
            try:
                data = self._blobs.get(key, memory.artifacts.get)
                chunk = decode(data, fingerprint=fingerprint, layout=layout,
                               where=f"{memory.artifacts.uri(key)} (item {item_id})")
            except (ArtifactCorrupt, ModelMismatch):
                self._blobs.drop(key)
                self._damaged(memory, scope, item_id)
                raise
            if chunk.item_id != item_id:
                self._damaged(memory, scope, item_id)
                raise ArtifactCorrupt(f"KV blob {memory.artifacts.uri(key)} holds item {chunk.item_id}, "
                                      f"not {item_id}; the next consolidation re-encodes it")
            chunks.append(chunk)
        tokens = sum(c.span for c in chunks)
        if tokens:
            memory.measure(self.name, "read_ms_per_token", 1000 * (time.perf_counter() - started) / tokens)
        return chunks

    def _damaged(self, memory, scope, item_id):
        """Record in Postgres that an item's blob failed to load: no process offers it again, and the next
        consolidation, in whichever process or worker, re-encodes it."""
        try:
            with memory.store.scoped(Scope(scope.user_id)) as db:
                db.execute("UPDATE kv_items SET damaged = true WHERE item_id = %s", (item_id,))
        except Exception:  # noqa: BLE001 - the load's own error is the one to raise
            log.warning("kv: could not record item %s's blob as damaged", item_id, exc_info=True)

    @hookimpl
    def memplug_footprint(self, memory, item_ids, db):
        rows = db.execute("SELECT item_id, bytes FROM kv_items WHERE item_id = ANY(%s::bigint[])",
                          (list(item_ids),)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    @hookimpl
    def memplug_costs(self, memory, scope):
        """Reads: load, check and de-quantize a blob (no prompt tokens); writes: encode; bytes per token."""
        m = memory.measured(self.name)

        def get(metric, prior):
            return m[metric][0] if metric in m else prior
        return TierCost(self.name, self.level, read_ms=0.0,
                        read_ms_per_token=get("read_ms_per_token", COST_PRIORS["read_ms_per_token"]),
                        write_ms_per_token=get("write_ms_per_token", COST_PRIORS["write_ms_per_token"]),
                        bytes_per_token=get("bytes_per_token", COST_PRIORS["bytes_per_token"]),
                        samples=sum(n for _, n in m.values()))

    # -- forget -----------------------------------------------------------------

    @hookimpl
    def memplug_forget(self, memory, scope, item_ids, db):
        self._drop(memory, db, list(item_ids))




def _layout(model) -> dict[str, int]:
    return {"layers": model.layers, "kv_heads": model.kv_heads, "head_dim": model.head_dim}


def _artifact_key(fingerprint: str, item) -> str:
    u, a, s = item.scope.key
    return f"kv/{fingerprint[:16]}/{u}/{a or '_'}/{s or '_'}/{item.id}.safetensors"


class _BlobCache:
    """Recently read blob bytes, up to a size. Bytes are immutable: a reader can't alter the cache."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key, fetch):
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
                return data
        data = fetch(key)
        if len(data) <= self.max_bytes:
            with self._lock:
                if key not in self._data:
                    self._data[key] = data
                    self._size += len(data)
                while self._size > self.max_bytes:
                    _, old = self._data.popitem(last=False)
                    self._size -= len(old)
        return data

    def drop(self, key):
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._size -= len(old)
