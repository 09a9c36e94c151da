"""Tier ``lora`` (level 3): knowledge in the weights, as one LoRA adapter per scope.

When consolidation moves items to level 3, the tier retrains the adapter of
each scope concerned on all of that scope's level-3 items: it writes
questions, paraphrases and cloze prompts from the items (with the local
model's help, see :mod:`memplug.runtime.synth`), mixes in replay of the base
model's own answers, trains a LoRA with PEFT on a private copy of the model,
and measures each item's recall on held-out questions
(:mod:`memplug.runtime.lora`).

The adapter is written to the artifact store in PEFT's format
(``adapter_model.safetensors`` + ``adapter_config.json``; the safetensors
header carries the base model's fingerprint and a digest), then registered in
``lora_adapters`` in the consolidation's transaction: the commit is the switch,
so a reader sees the old version or the new one, never a half-written one.

On read the tier offers the scope's newest adapter for the loaded model as an
:class:`memplug.AdapterRef`, with the items whose recall passed
``lora_min_recall``: the host does not repeat those as text. Items that failed
stay served by the lower tiers.

Forgetting an item deletes every adapter version trained on it at once (rows,
then files after commit, and the resident copy). The scope's other items are
retrained at the next consolidation; with none left, nothing is retrained.

Options: ``lora_rank`` (8), ``lora_alpha`` (16), ``lora_lr`` (3e-3),
``lora_epochs`` (3), ``lora_min_steps`` (96: fewer items get more epochs), ``lora_targets``
(comma-separated module names),
``lora_replay`` (0.25), ``lora_kl`` (1: the replay loss's weight), ``lora_replay_tokens`` (16), ``lora_contrast_tokens`` (16: each item's
questions about another subject are held to the base model over the first 16 tokens of its
answer to them, where the user's values would leak in; 0: at the answer's first token only,
16 s less at 50 items as measured with fp32 contrast answers, which now take 5 s less, and more
general answers changed), ``lora_served`` (0.5: share of item examples asked among other memories,
as reads serve them), ``lora_min_recall`` (0.5), ``lora_max_train_s`` (600),
``lora_max_items`` (200 per scope), ``lora_isolate`` (on: train in a child
process, see :mod:`memplug.runtime.child`), ``lora_resident`` (adapters kept loaded, 8),
``lora_resident_mb`` (256), ``lora_gate`` (0.5; 0 applies the adapter to every read),
``lora_precision`` (auto: bfloat16 autocast where the hardware has it; bf16; fp32),
``lora_first_layer`` (0: adapt every layer; N: only layers N and up, whose inputs are
then computed once per example, trading recall for training time), ``lora_weight_decay``
(0: AdamW's decay of the LoRA weights; higher keeps the adapter smaller and the general
answers steadier, for less recall at 50 items and more).

**Routing.** An adapter also changes how the model answers questions it was
not trained for (the benchmark measures how much). So it is applied only to
reads that concern it: when the query's embedding is within cosine
``lora_gate`` of one of the items it holds, each with its value taken out
(:func:`memplug.runtime.synth.without_value`). A question about an item's subject
("Where does Kara live?") reaches the adapter; one that already names its value
("In which country is Kyoto?") is about something else. Other reads get the base model.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections import OrderedDict

from psycopg.types.json import Jsonb

from memplug import (
    AdapterRef,
    ArtifactCorrupt,
    ConfigError,
    InvalidInput,
    ModelMismatch,
    Move,
    Placement,
    Scope,
    TierCost,
    hookimpl,
)
from memplug.memory import ITEM_COLUMNS, item_from_row
from memplug.runtime.synth import without_value
from memplug.scoping import subtree_sql, visible_sql
from memplug.settings import flag
from memplug.store import row_security
from memplug.types import adapter_name

log = logging.getLogger(__name__)
LEVEL = 3
# Costs before anything was measured here (SmolLM2-135M on 2 CPU cores; benchmarks/results/lora.json).
COST_PRIORS = {"read_ms": 2.0, "write_ms": 60_000.0, "write_ms_per_item": 8_000.0}
MIGRATIONS = (
    """
    CREATE TABLE lora_adapters (
        id           bigserial PRIMARY KEY,
        user_id      text NOT NULL,
        agent_id     text NOT NULL,
        session_id   text NOT NULL,
        artifact     text NOT NULL,
        bytes        integer NOT NULL,
        fingerprint  text NOT NULL,
        item_ids     bigint[] NOT NULL,
        recall       real NOT NULL,
        metrics      jsonb NOT NULL,
        stale        boolean NOT NULL DEFAULT false,
        created_at   timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX lora_adapters_scope ON lora_adapters (user_id, agent_id, session_id, id DESC);
    CREATE INDEX lora_adapters_items ON lora_adapters USING gin (item_ids);
    CREATE TABLE lora_items (
        item_id     bigint PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
        user_id     text NOT NULL,
        agent_id    text NOT NULL,
        session_id  text NOT NULL,
        adapter_id  bigint REFERENCES lora_adapters(id) ON DELETE SET NULL,
        recall      real,
        passed      boolean NOT NULL DEFAULT false
    );
    CREATE INDEX lora_items_scope ON lora_items (user_id, agent_id, session_id);
    CREATE INDEX lora_items_adapter ON lora_items (adapter_id);
    """,
    # 2: a scoped transaction sees its own user's adapters and items only
    row_security("lora_adapters") + row_security("lora_items"),
)

# The options that set TrainConfig: (option name, TrainConfig field, type). ``lora_targets`` is a list.
OPTIONS = (
    ("lora_rank", "rank", int), ("lora_alpha", "alpha", float), ("lora_lr", "lr", float),
    ("lora_epochs", "epochs", int), ("lora_min_steps", "min_steps", int), ("lora_served", "served", float),
    ("lora_replay", "replay", float), ("lora_replay_tokens", "replay_tokens", int), ("lora_kl", "kl", float),
    ("lora_contrast_tokens", "contrast_tokens", int),
    ("lora_min_recall", "min_recall", float), ("lora_max_train_s", "max_seconds", float),
    ("lora_precision", "precision", str), ("lora_first_layer", "first_layer", int),
    ("lora_weight_decay", "weight_decay", float),
)


# One training at a time per machine, whichever process or thread starts it. Each training's
# torch starts a thread per core, and OpenMP threads in different processes spin-wait against
# each other: two concurrent 3-second trainings on 2 cores ran for over ten minutes. One after
# the other, they take the same total time as two at once would at best. The lock is a
# Postgres advisory lock keyed by the host name, taken in the consolidation's transaction and
# held to its end: every worker of a deployment sees it, and Postgres's deadlock detector
# sees its waits (a file lock's would be invisible to it).
TRAINING_LOCK = "memplug-lora-training"


def _one_training_per_machine(db, scope_label: str, report) -> None:
    key = (TRAINING_LOCK, socket.gethostname())
    if db.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s), hashtext(%s))", key).fetchone()[0]:
        return
    log.info("lora %s: waiting for another training on this machine to finish", scope_label)
    report("waiting for another training on this machine", 0, 1, {})
    db.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", key)
    report("waiting for another training on this machine", 1, 1, {})


class LoraTier:
    """Knowledge in the weights: a per-scope LoRA adapter, trained from synthetic data."""

    name = "lora"
    level = LEVEL

    @hookimpl
    def memplug_configure(self, memory):
        memory.store.migrate("lora", MIGRATIONS)
        opt = memory.settings.option
        from memplug.runtime.lora import TrainConfig

        targets = opt("lora_targets", None, str)
        options = {name: (field, opt(name, getattr(TrainConfig, field), cast)) for name, field, cast in OPTIONS}
        if targets:
            options["lora_targets"] = ("targets", tuple(t.strip() for t in targets.split(",") if t.strip()))
        try:
            self.config = TrainConfig(**dict(options.values()))
        except InvalidInput as e:  # name the options that are wrong, not TrainConfig's fields
            bad = [f"{name}={value!r}" for name, (field, value) in options.items() if not _valid(field, value)]
            raise ConfigError("invalid lora option(s): " + ", ".join(bad or [str(e)])) from e
        self.max_items = opt("lora_max_items", 200, int)
        self.isolate = opt("lora_isolate", True, flag)
        if self.isolate:
            from memplug.runtime import child

            why = child.available()
            if why is not None:
                log.warning("lora: training in this process (lora_isolate is on, but %s)", why)
                self.isolate = False
        self.resident = opt("lora_resident", 8, int)
        self.resident_bytes = opt("lora_resident_mb", 256, int) << 20
        self._damaged: set[int] = set()
        self.gate = opt("lora_gate", 0.5, float)
        if not -1.0 <= self.gate <= 1.0:
            raise ConfigError(f"lora_gate must be a cosine similarity in [-1, 1], got {self.gate!r}")
        self._vectors: OrderedDict[int, object] = OrderedDict()  # adapter id -> its items' embeddings
        self._vectors_lock = threading.Lock()

    # -- consolidation ------------------------------------------------------------

    @hookimpl
    def memplug_plan(self, memory, scope, usage):
        """Retrain scopes with items waiting (new, after a forget or a demotion), a damaged
        adapter, or an adapter trained on another model."""
        where, params = subtree_sql(scope, "l")
        with memory.store.scoped(scope) as db:
            if not db.execute(f"SELECT EXISTS (SELECT 1 FROM lora_items l WHERE {where})", params).fetchone()[0]:
                return None
            params.update(fp=memory.model_fingerprint, damaged=sorted(self._damaged))
            ids = [r[0] for r in db.execute(
                f"""
                SELECT l.item_id FROM lora_items l LEFT JOIN lora_adapters a ON a.id = l.adapter_id
                WHERE {where} AND (a.id IS NULL OR a.stale OR a.fingerprint <> %(fp)s
                                   OR a.id = ANY(%(damaged)s::bigint[]))
                ORDER BY l.item_id
                """, params).fetchall()]
        return [Move(tuple(ids), 1, self.level, "retrain the scope's adapter")] if ids else None

    @hookimpl
    def memplug_consolidate(self, memory, scope, moves, db, progress):
        up = sorted({i for m in moves if m.dst_level == self.level for i in m.item_ids})
        down = sorted({i for m in moves if m.src_level == self.level and m.dst_level < self.level
                       for i in m.item_ids})
        done = []
        if down:
            scopes = db.execute(
                "DELETE FROM lora_items WHERE item_id = ANY(%s::bigint[]) "
                "RETURNING user_id, agent_id, session_id", (down,)).fetchall()
            for u, a, s in set(scopes):
                left = db.execute("SELECT EXISTS (SELECT 1 FROM lora_items WHERE user_id = %s AND agent_id = %s "
                                  "AND session_id = %s)", (u, a, s)).fetchone()[0]
                if not left:  # nothing left at level 3 here: the scope's adapters go now, files on commit
                    self._delete(memory, db, db.execute(
                        "DELETE FROM lora_adapters WHERE user_id = %s AND agent_id = %s AND session_id = %s "
                        "RETURNING id, artifact, fingerprint", (u, a, s)).fetchall())
                    continue
                # The adapter still holds the demoted items; the next consolidation retrains without them.
                db.execute("UPDATE lora_adapters SET stale = true WHERE user_id = %s AND agent_id = %s "
                           "AND session_id = %s", (u, a, s))
            done.append(Placement(self.name, self.level, down, "demoted", held=False))
        if up:
            db.execute(
                """
                INSERT INTO lora_items (item_id, user_id, agent_id, session_id)
                SELECT i.id, i.user_id, i.agent_id, i.session_id FROM items i WHERE i.id = ANY(%s::bigint[])
                ON CONFLICT (item_id) DO NOTHING
                """, (up,))
            keys = db.execute(
                "SELECT DISTINCT user_id, agent_id, session_id FROM lora_items WHERE item_id = ANY(%s::bigint[]) "
                "ORDER BY 1, 2, 3", (up,)).fetchall()
            for key in keys:
                done += self._train_scope(memory, db, tuple(key), progress)
        return done

    def _train_scope(self, memory, db, key, progress):
        from memplug.runtime import child, lora

        u, a, s = key
        rows = db.execute(
            f"SELECT {ITEM_COLUMNS} FROM lora_items l JOIN items i ON i.id = l.item_id "
            "WHERE l.user_id = %s AND l.agent_id = %s AND l.session_id = %s ORDER BY i.id",
            (u, a, s)).fetchall()
        items = [item_from_row(r) for r in rows]
        if len(items) > self.max_items:
            # The most recent items win; the others leave level 3 and stay with the lower tiers.
            dropped = [it.id for it in items[:-self.max_items]]
            db.execute("DELETE FROM lora_items WHERE item_id = ANY(%s::bigint[])", (dropped,))
            log.info("lora: scope %s/%s/%s has %d items at level 3; the oldest %d stay text (lora_max_items=%d)",
                     u, a, s, len(items), len(dropped), self.max_items)
            items = items[-self.max_items:]
        scope_label = "/".join(x for x in key if x) or u

        def report(stage, done_, total, info):
            if progress is not None:
                progress(f"lora {scope_label}: {stage}", done_, total, info)

        _one_training_per_machine(db, scope_label, report)
        started = time.perf_counter()
        job = {"home": str(memory.settings.home), "model": memory.settings.model,
               "statements": [it.text for it in items], "item_ids": [it.id for it in items], "cfg": self.config}
        if self.isolate:  # a fresh process: see memplug.runtime.child
            result, fingerprint = child.call("memplug.runtime.lora:train_items", job, report,
                                             what=f"lora training for {scope_label}")
        else:
            result, fingerprint = lora.train_items(**job, progress=report)
        # Costs for the policies: the minimum steps are the fixed part of a retrain, the rest is per item.
        total_ms = 1000 * (time.perf_counter() - started)
        fixed_ms = min(total_ms, 1000 * result.metrics["seconds"] / max(1, result.metrics["steps"])
                       * self.config.min_steps)
        # Buffered, not written in this transaction: the shared cost row would stay locked to its
        # end, and another worker's training would wait on it while holding the training lock.
        memory.measure(self.name, "write_ms", fixed_ms)
        memory.measure(self.name, "write_ms_per_item", (total_ms - fixed_ms) / len(items))
        passed = set(result.passed(self.config.min_recall))
        mean = sum(result.recall.values()) / len(result.recall)
        adapter_id = db.execute(
            """
            INSERT INTO lora_adapters (user_id, agent_id, session_id, artifact, bytes, fingerprint, item_ids,
                                       recall, metrics)
            VALUES (%s, %s, %s, '', 0, %s, %s, %s, %s) RETURNING id
            """,
            (u, a, s, fingerprint, [it.id for it in items], mean,
             Jsonb(_json_safe(result.metrics))),
        ).fetchone()[0]
        meta = {"adapter_id": adapter_id, "scope": list(key), "item_ids": [it.id for it in items],
                "recall": {str(k): v for k, v in result.recall.items()}, "metrics": _json_safe(result.metrics)}
        weights, config = lora.pack(result, fingerprint, meta)
        prefix = _artifact_prefix(fingerprint, key, adapter_id)
        for name, data_ in ((lora.WEIGHTS_FILE, weights), (lora.CONFIG_FILE, config)):
            memory.artifacts.put(f"{prefix}/{name}", data_)
            memory.store.on_rollback(db, functools.partial(memory.artifacts.delete, f"{prefix}/{name}"))
        db.execute("UPDATE lora_adapters SET artifact = %s, bytes = %s WHERE id = %s",
                   (prefix, len(weights) + len(config), adapter_id))
        db.execute(
            """
            UPDATE lora_items l SET adapter_id = %(id)s, recall = r.recall, passed = r.recall >= %(floor)s
            FROM unnest(%(ids)s::bigint[], %(recalls)s::real[]) AS r(item_id, recall)
            WHERE l.item_id = r.item_id
            """,
            {"id": adapter_id, "ids": list(result.recall), "recalls": list(result.recall.values()),
             "floor": self.config.min_recall})
        self._prune(memory, db, key, adapter_id)
        log.info("lora: scope %s adapter %d: %d/%d items recalled (mean %.2f), %.0f s, %d bytes",
                 scope_label, adapter_id, len(passed), len(items), mean, result.metrics["seconds"], len(weights))
        failed = [it.id for it in items if it.id not in passed]
        m = result.metrics
        out = [Placement(self.name, self.level, sorted(passed),
                         f"trained in {total_ms / 1000:.0f} s: {m['steps']} steps, {len(m['history'])} recall checks,"
                         f" stopped on {m['stopped']}")]
        if failed:
            out.append(Placement(self.name, self.level, failed, "not recalled: served by lower tiers", held=False))
        return out

    def _prune(self, memory, db, key, newest):
        """Keep the newest adapter and the one before it (a reader may be loading it); drop older ones."""
        u, a, s = key
        old = db.execute(
            """
            DELETE FROM lora_adapters WHERE user_id = %s AND agent_id = %s AND session_id = %s AND id < %s
              AND id <> coalesce((SELECT max(id) FROM lora_adapters WHERE user_id = %s AND agent_id = %s
                                  AND session_id = %s AND id < %s), 0)
            RETURNING id, artifact, fingerprint
            """, (u, a, s, newest, u, a, s, newest)).fetchall()
        self._delete(memory, db, old)
        # Files of a training that died before its commit (a killed worker) belong to no row.
        fingerprint = db.execute("SELECT fingerprint FROM lora_adapters WHERE id = %s", (newest,)).fetchone()[0]
        folder = _artifact_prefix(fingerprint, key, newest).rsplit("/", 1)[0]
        known = {r[0] for r in db.execute(
            "SELECT id FROM lora_adapters WHERE user_id = %s AND agent_id = %s AND session_id = %s",
            (u, a, s)).fetchall()}
        for path in memory.artifacts.list(folder):
            name = path[len(folder) + 1:].split("/", 1)[0]
            if name.isdigit() and int(name) < newest and int(name) not in known:
                log.info("lora: removing %s, left by a training that never committed", path)
                memory.store.on_commit(db, functools.partial(memory.artifacts.delete, path))

    def _delete(self, memory, db, rows):
        from memplug.runtime.lora import CONFIG_FILE, WEIGHTS_FILE
        from memplug.runtime.model import loaded

        resident = loaded(memory.settings.home, memory.settings.model)
        for adapter_id, prefix, fingerprint in rows:
            for name in (WEIGHTS_FILE, CONFIG_FILE) if prefix else ():
                memory.store.on_commit(db, functools.partial(memory.artifacts.delete, f"{prefix}/{name}"))
            if resident is not None:
                name = adapter_name(self.name, adapter_id, fingerprint)
                memory.store.on_commit(db, functools.partial(resident.drop_adapter, name))

    # -- read -----------------------------------------------------------------------

    @hookimpl
    def memplug_read(self, memory, scope, query, budget, filters, db):
        where, params = visible_sql(scope, "a")
        if not db.execute(f"SELECT EXISTS (SELECT 1 FROM lora_adapters a WHERE {where})", params).fetchone()[0]:
            return None
        params.update(fp=memory.model_fingerprint, damaged=sorted(self._damaged))
        # The most specific scope's newest adapter for the loaded model.
        row = db.execute(
            f"""
            SELECT a.id, a.user_id, a.agent_id, a.session_id, a.artifact, a.bytes, a.fingerprint
            FROM lora_adapters a
            WHERE {where} AND a.fingerprint = %(fp)s AND a.artifact <> '' AND NOT (a.id = ANY(%(damaged)s))
              AND EXISTS (SELECT 1 FROM lora_items l WHERE l.adapter_id = a.id AND l.passed)
            ORDER BY (a.agent_id <> '')::int + (a.session_id <> '')::int DESC, a.id DESC LIMIT 1
            """, params).fetchone()
        if row is None:
            return None
        adapter_id, u, a, s, prefix, size, fingerprint = row
        items = tuple(item_from_row(r) for r in db.execute(
            f"SELECT {ITEM_COLUMNS} FROM lora_items l JOIN items i ON i.id = l.item_id "
            "WHERE l.adapter_id = %s AND l.passed ORDER BY i.id", (adapter_id,)).fetchall())
        if self.gate > 0 and self._relevance(memory, adapter_id, items, query) < self.gate:
            return None  # the read is not about what the adapter holds: the base model answers it
        loader = functools.partial(self._load, memory, adapter_id, prefix, fingerprint)
        ref = AdapterRef(self.name, Scope(u, a or None, s or None), adapter_id, fingerprint, items,
                         memory.artifacts.uri(prefix), size, loader)
        return [ref]

    @hookimpl
    def memplug_footprint(self, memory, item_ids, db):
        rows = db.execute(
            """
            SELECT l.item_id, a.bytes / greatest(1, (SELECT count(*) FROM lora_items x WHERE x.adapter_id = a.id))
            FROM lora_items l JOIN lora_adapters a ON a.id = l.adapter_id
            WHERE l.item_id = ANY(%s::bigint[]) AND l.passed
            """, (list(item_ids),)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    @hookimpl
    def memplug_costs(self, memory, scope):
        """Reads: an adapter switch per read, no prompt tokens. Writes: a retrain of the scope's
        adapter, a fixed part (synthesis set-up, the minimum steps) plus a part per item held."""
        m = memory.measured(self.name)
        with memory.store.scoped(scope) as db:
            u, a, s = scope.key
            recent = db.execute(
                "SELECT count(*) FROM lora_adapters WHERE user_id = %s AND agent_id = %s AND session_id = %s "
                "AND created_at > now() - interval '1 day'", (u, a, s)).fetchone()[0]

        def get(metric):
            return m[metric][0] if metric in m else COST_PRIORS[metric]
        return TierCost(self.name, self.level, read_ms=get("read_ms"), write_ms=get("write_ms"),
                        write_ms_per_item=get("write_ms_per_item"), writes_24h=int(recent),
                        samples=sum(n for _, n in m.values()))

    def _relevance(self, memory, adapter_id, items, query):
        """The highest cosine similarity between the query and an item the adapter holds, its value
        taken out (see *Routing* above)."""
        with self._vectors_lock:
            vectors = self._vectors.get(adapter_id)
            if vectors is not None:
                self._vectors.move_to_end(adapter_id)
        if vectors is None:
            vectors = memory.embedder.encode([without_value(it.text) for it in items])
            with self._vectors_lock:
                self._vectors[adapter_id] = vectors
                while len(self._vectors) > max(1, self.resident):
                    self._vectors.popitem(last=False)
        return float((vectors @ memory.embedder.encode([query])[0]).max())

    def _load(self, memory, adapter_id, prefix, fingerprint):
        from memplug.runtime import lora

        model = memory.model
        model.max_adapters, model.max_adapter_bytes = self.resident, self.resident_bytes
        where = f"{memory.artifacts.uri(prefix)} (adapter {adapter_id})"
        try:
            weights = memory.artifacts.get(f"{prefix}/{lora.WEIGHTS_FILE}")
            config = memory.artifacts.get(f"{prefix}/{lora.CONFIG_FILE}")
            return lora.unpack(weights, config, fingerprint, where)
        except (ArtifactCorrupt, ModelMismatch):
            self._damaged.add(adapter_id)
            raise
        except FileNotFoundError as e:
            self._damaged.add(adapter_id)
            raise ArtifactCorrupt(f"adapter {where} is missing a file ({e}); the next consolidation retrains it") \
                from e

    # -- forget -----------------------------------------------------------------------

    @hookimpl
    def memplug_forget(self, memory, scope, item_ids, db):
        """Every adapter version trained on a forgotten item goes at once; the rest retrain later."""
        rows = db.execute(
            "DELETE FROM lora_adapters WHERE item_ids && %s::bigint[] RETURNING id, artifact, fingerprint",
            (list(item_ids),)).fetchall()
        self._delete(memory, db, rows)
        db.execute("DELETE FROM lora_items WHERE item_id = ANY(%s::bigint[])", (list(item_ids),))


def _artifact_prefix(fingerprint: str, key, adapter_id: int) -> str:
    u, a, s = key
    return f"lora/{fingerprint[:16]}/{u}/{a or '_'}/{s or '_'}/{adapter_id}"


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def _valid(field: str, value: object) -> bool:
    """Whether TrainConfig accepts ``value`` for ``field`` (with its defaults elsewhere)."""
    from memplug.runtime.lora import TrainConfig

    try:
        TrainConfig(**{field: value})
    except InvalidInput:
        return False
    return True
