"""Tier ``lora`` (level 3): knowledge in the weights, as one LoRA adapter per scope.

When consolidation moves items to level 3, the tier queues them (``lora_items``)
in the consolidation's short transaction; then, outside any transaction
(``memplug_build``), it retrains the adapter of each scope concerned on all of
that scope's level-3 items: it writes questions, paraphrases and cloze prompts
from the items (with the local model's help, see :mod:`memplug_lora.synth`),
mixes in replay of the base model's own answers, trains a LoRA with PEFT on a
private copy of the model, and measures each item's recall on held-out
questions (:mod:`memplug_lora.train`).

The adapter is written to the artifact store in PEFT's format
(:mod:`memplug_lora.adapter`: the safetensors header carries the base model's
fingerprint and a digest), then registered in ``lora_adapters`` with the items'
placements, in one short transaction: the commit is the switch, so a reader
sees the old version or the new one, never a half-written one. An item
forgotten or demoted while its adapter trained voids that training.

On read the tier offers the scope's newest adapter for the loaded model as an
:class:`memplug.AdapterRef`, with the items whose recall passed
``lora_min_recall``: the host does not repeat those as text. Items that failed
stay served by the lower tiers.

Forgetting an item deletes every adapter version trained on it at once (rows,
then files after commit, and the resident copy). The scope's other items are
retrained at the next consolidation; with none left, nothing is retrained.
An adapter found damaged on load (by any process) is marked in ``lora_adapters``:
no read offers it again, and the next consolidation retrains it.

The tier needs peft (``pip install 'memplug[lora]'``); without it, it is listed
as unavailable and no policy plans moves to level 3. Its options are declared
in :data:`LoraTier.options` (``memplug options`` lists them).

**Routing.** An adapter also changes how the model answers questions it was
not trained for (the benchmark measures how much). So it is applied only to
reads that concern it: when the query's embedding is within cosine
``lora_gate`` of one of the items it holds, each with its value taken out
(:func:`memplug.runtime.without_value`). A question about an item's subject
("Where does Kara live?") reaches the adapter; one that already names its value
("In which country is Kyoto?") is about something else. Other reads get the base model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

import psycopg
from psycopg.types.json import Jsonb

from memplug.plugin import (
    ITEM_COLUMNS,
    AdapterRef,
    ArtifactCorrupt,
    ConfigError,
    InvalidInput,
    ModelMismatch,
    Move,
    Option,
    Placement,
    Scope,
    TierCost,
    adapter_name,
    flag,
    hookimpl,
    item_from_row,
    row_security,
    subtree_sql,
    visible_sql,
)
from memplug.runtime import without_value

from .adapter import CONFIG_FILE, WEIGHTS_FILE, pack, unpack

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
    # 3: an adapter found damaged by any process is never offered again and is retrained; the reason of
    # the move that queued an item, for its history once it is trained
    """
    ALTER TABLE lora_adapters ADD COLUMN damaged boolean NOT NULL DEFAULT false;
    ALTER TABLE lora_items ADD COLUMN queued_for text;
    """,
)

# The options that set TrainConfig, each declared with its field's default:
# (option name, TrainConfig field, type, allowed range, help).
TRAINING = (
    ("lora_rank", "rank", int, {"min": 1}, "The adapter's rank."),
    ("lora_alpha", "alpha", float, {"gt": 0}, "LoRA alpha: the adapter's scale is alpha / rank."),
    ("lora_lr", "lr", float, {"gt": 0, "lt": 1}, "Learning rate (AdamW, warm-up then linear decay)."),
    ("lora_epochs", "epochs", int, {"min": 1}, "Epochs over the synthetic examples."),
    ("lora_min_steps", "min_steps", int, {"min": 0}, "Optimizer steps a training takes at least: few items get "
     "more epochs."),
    ("lora_served", "served", float, {"min": 0, "max": 1}, "Share of item examples asked among other memories, "
     "as reads serve them."),
    ("lora_replay", "replay", float, {"min": 0}, "Replay examples (the base model's own answers to neutral "
     "prompts) per item example."),
    ("lora_replay_tokens", "replay_tokens", int, {"min": 0}, "First tokens of each replay answer trained on "
     "(0: all of it)."),
    ("lora_kl", "kl", float, {"min": 0}, "Weight of the replay loss, a KL to the base model (0: cross-entropy "
     "on its answers)."),
    ("lora_contrast_tokens", "contrast_tokens", int, {"min": 0}, "Tokens of the base model's answer to an "
     "item's questions about another subject that the adapter is held to (0: the first only)."),
    ("lora_min_recall", "min_recall", float, {"min": 0, "max": 1}, "Held-out recall an item needs to count as "
     "held by the adapter (the others stay served as text)."),
    ("lora_max_train_s", "max_seconds", float, {"gt": 0}, "Seconds a training may take at most."),
    ("lora_precision", "precision", str, {"choices": ("auto", "bf16", "fp32")}, "Training precision: auto is "
     "bfloat16 autocast where the hardware has it."),
    ("lora_first_layer", "first_layer", int, {"min": 0}, "Adapt only layers from this one up (their inputs are "
     "computed once per example), trading recall for training time."),
    ("lora_weight_decay", "weight_decay", float, {"min": 0}, "AdamW's decay of the LoRA weights: higher keeps "
     "general answers steadier, for less recall."),
)


def _training_options() -> tuple[Option, ...]:
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(_train_config())}
    return tuple(Option(name, cast, defaults[field], help_, **bounds) for name, field, cast, bounds, help_ in TRAINING) \
        + (Option("lora_targets", str, ",".join(defaults["targets"]), "The modules the adapter adapts "
                  "(comma-separated names)."),)


def _train_config():
    from .train import TrainConfig

    return TrainConfig


# One training at a time per machine, whichever process or thread starts it. Each training's
# torch starts a thread per core, and OpenMP threads in different processes spin-wait against
# each other: two concurrent 3-second trainings on 2 cores ran for over ten minutes. One after
# the other, they take the same total time as two at once would at best. The lock is a
# Postgres advisory lock keyed by the host name, held by a connection of its own (no
# transaction stays open meanwhile) until the adapter is registered: every worker of a
# deployment sees it, and a process that dies releases it with its connection.
TRAINING_LOCK = "memplug-lora-training"


@contextlib.contextmanager
def _one_training_per_machine(memory, scope_label: str, report) -> Iterator[None]:
    key = (TRAINING_LOCK, socket.gethostname())
    # Keepalives: the connection idles through the training, and a peer that drops it silently
    # would release the lock unseen. A session lock needs a session: behind a pooler, session pooling.
    conn = memory.store.connect(autocommit=True, keepalives=1, keepalives_idle=30, keepalives_interval=10,
                                keepalives_count=3)
    try:
        if not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))", key).fetchone()[0]:
            log.info("lora %s: waiting for another training on this machine to finish", scope_label)
            report("waiting for another training on this machine", 0, 1, {})
            conn.execute("SELECT pg_advisory_lock(hashtext(%s), hashtext(%s))", key)
            report("waiting for another training on this machine", 1, 1, {})
        yield
    finally:
        try:  # closing releases the lock too; a connection lost meanwhile only costs the explicit unlock
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s), hashtext(%s))", key)
        except psycopg.Error as e:
            log.warning("lora %s: the training lock's connection was lost (%s); the lock went with it",
                        scope_label, e)
        finally:
            conn.close()


class LoraTier:
    """Knowledge in the weights: a per-scope LoRA adapter, trained from synthetic data."""

    name = "lora"
    level = LEVEL
    requires = ("peft",)
    install = "pip install 'memplug[lora]'"
    options = _training_options() + (
        Option("lora_max_items", int, 200, "Items one scope's adapter holds at most; the oldest stay text.",
               min=1),
        Option("lora_isolate", flag, True, "Train in a child process, whose memory goes back to the system "
               "when it ends.", metavar="bool"),
        Option("lora_resident", int, 8, "Adapters kept loaded in the local model at once.", min=1),
        Option("lora_resident_mb", int, 256, "Megabytes of loaded adapters kept at most.", min=1),
        Option("lora_gate", float, 0.5, "Cosine similarity a query needs to an item the adapter holds (its value "
               "taken out) for the adapter to be applied; 0 applies it to every read.", min=-1, max=1),
    )

    @hookimpl
    def memplug_configure(self, memory):
        memory.store.migrate("lora", MIGRATIONS)
        TrainConfig = _train_config()  # noqa: N806 - a class
        values = {field: memory.option(name) for name, field, *_ in TRAINING}
        values["targets"] = tuple(t.strip() for t in memory.option("lora_targets").split(",") if t.strip())
        if not values["targets"]:
            raise ConfigError(f"option lora_targets={memory.option('lora_targets')!r} (plugin lora) names no "
                              "module; give module names separated by commas, e.g. gate_proj,up_proj,down_proj")
        try:
            self.config = TrainConfig(**values)
        except InvalidInput as e:  # the declarations' ranges are TrainConfig's: this is a safety net
            raise ConfigError(f"a lora option is out of range: {e}") from e
        # Adapters the backend could not serve are refused now, not at serve time.
        memory.check_adapter_shape(rank=self.config.rank, targets=self.config.targets,
                                   where="the lora tier's adapters (options lora_rank, lora_targets)")
        self.max_items = memory.option("lora_max_items")
        self.isolate = memory.option("lora_isolate")
        if self.isolate:
            from memplug.runtime import child_available

            why = child_available()
            if why is not None:
                log.warning("lora: training in this process (lora_isolate is on, but %s)", why)
                self.isolate = False
        self.resident = memory.option("lora_resident")
        self.resident_bytes = memory.option("lora_resident_mb") << 20
        self.gate = memory.option("lora_gate")
        self._vectors: OrderedDict[int, object] = OrderedDict()  # adapter id -> its items' embeddings
        self._vectors_lock = threading.Lock()

    # -- consolidation ------------------------------------------------------------

    @hookimpl
    def memplug_plan(self, memory, scope, usage):
        """Retrain scopes with items waiting (new, after a forget or a demotion), a damaged
        adapter, or an adapter trained on another model."""
        ids = [i for _, items in self._waiting(memory, scope) for i in items]
        return [Move(tuple(ids), 1, self.level, "retrain the scope's adapter")] if ids else None

    def _waiting(self, memory, scope) -> list[tuple[tuple[str, str, str], list[int]]]:
        """Scopes under ``scope`` whose adapter must be (re)trained, each with the items waiting."""
        where, params = subtree_sql(scope, "l")
        with memory.store.scoped(scope) as db:
            if not db.execute(f"SELECT EXISTS (SELECT 1 FROM lora_items l WHERE {where})", params).fetchone()[0]:
                return []
            params["fp"] = memory.model_fingerprint
            rows = db.execute(
                f"""
                SELECT l.user_id, l.agent_id, l.session_id, array_agg(l.item_id ORDER BY l.item_id)
                FROM lora_items l LEFT JOIN lora_adapters a ON a.id = l.adapter_id
                WHERE {where} AND (a.id IS NULL OR a.stale OR a.damaged OR a.fingerprint <> %(fp)s)
                GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                """, params).fetchall()
        return [((u, a, s), list(ids)) for u, a, s, ids in rows]

    @hookimpl
    def memplug_consolidate(self, memory, scope, moves, db):
        """Demotions are done here; promotions are queued, and trained in :meth:`memplug_build`."""
        down = sorted({i for m in moves if m.src_level == self.level and m.dst_level < self.level
                       for i in m.item_ids})
        up = {i: m.reason for m in moves if m.dst_level == self.level for i in m.item_ids}
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
                # The adapter still holds the demoted items; the next training goes without them.
                db.execute("UPDATE lora_adapters SET stale = true WHERE user_id = %s AND agent_id = %s "
                           "AND session_id = %s", (u, a, s))
            done.append(Placement(self.name, self.level, down, "demoted", held=False))
        if up:
            db.execute(
                """
                INSERT INTO lora_items (item_id, user_id, agent_id, session_id, queued_for)
                SELECT i.id, i.user_id, i.agent_id, i.session_id, r.reason
                FROM unnest(%s::bigint[], %s::text[]) AS r(item_id, reason) JOIN items i ON i.id = r.item_id
                ON CONFLICT (item_id) DO UPDATE SET queued_for = EXCLUDED.queued_for
                """, (list(up), list(up.values())))
        return done

    @hookimpl
    def memplug_build(self, memory, scope, moves, progress):
        """Train the adapter of every scope that the consolidation's moves to level 3 concern and
        that has items waiting, one scope at a time."""
        up = {i for m in moves if m.dst_level == self.level for i in m.item_ids}
        done = []
        for key, items in self._waiting(memory, scope) if up else ():
            if up & set(items):
                done += self._train_scope(memory, key, progress)
        return done

    def _train_scope(self, memory, key, progress):
        u, a, s = key
        scope_label = "/".join(x for x in key if x) or u
        owner = Scope(u, a or None, s or None)

        def report(stage, done_, total, info):
            if progress is not None:
                progress(f"lora {scope_label}: {stage}", done_, total, info)

        with _one_training_per_machine(memory, scope_label, report):
            # Read after the lock: a training that held it may have trained this scope meanwhile.
            if not any(k == key for k, _ in self._waiting(memory, owner)):
                return []
            items, why = self._items(memory, owner, scope_label)
            if not items:
                return []
            started = time.perf_counter()
            result, fingerprint = self._train(memory, items, scope_label, report)
            total_ms = 1000 * (time.perf_counter() - started)
            return self._register(memory, owner, items, result, fingerprint, total_ms, why, scope_label)

    def _items(self, memory, owner, scope_label):
        """The scope's level-3 items, at most ``lora_max_items`` of the newest, and the reasons of the
        moves that queued them."""
        u, a, s = owner.key
        with memory.store.scoped(owner) as db:
            rows = db.execute(
                f"SELECT {ITEM_COLUMNS}, l.queued_for FROM lora_items l JOIN items i ON i.id = l.item_id "
                "WHERE l.user_id = %s AND l.agent_id = %s AND l.session_id = %s ORDER BY i.id",
                (u, a, s)).fetchall()
            if len(rows) > self.max_items:
                # The most recent items win; the others leave level 3 and stay with the lower tiers.
                dropped = [r[0] for r in rows[:-self.max_items]]
                db.execute("DELETE FROM lora_items WHERE item_id = ANY(%s::bigint[])", (dropped,))
                log.info("lora: scope %s has %d items at level 3; the oldest %d stay text (lora_max_items=%d)",
                         scope_label, len(rows), len(dropped), self.max_items)
                rows = rows[-self.max_items:]
        return [item_from_row(r) for r in rows], {r[0]: r[-1] for r in rows if r[-1]}

    def _train(self, memory, items, scope_label, report):
        """Train on ``items``, outside any transaction: in a child process, or here."""
        job = {"home": str(memory.settings.home), "model": memory.settings.model,
               "statements": [it.text for it in items], "item_ids": [it.id for it in items], "cfg": self.config}
        if self.isolate:  # a fresh process, whose memory goes back to the system when it ends
            from memplug.runtime import run_in_child

            return run_in_child("memplug_lora.train:train_items", job, report,
                                what=f"lora training for {scope_label}")
        from .train import train_items

        return train_items(**job, progress=report)

    def _register(self, memory, owner, items, result, fingerprint, total_ms, why, scope_label):
        """Register a trained adapter and its items' placements in one short transaction, unless one
        of its items was forgotten or demoted meanwhile: then the training is void (retrained later)."""
        u, a, s = key = owner.key
        ids = [it.id for it in items]
        # Costs for the policies: the minimum steps are the fixed part of a retrain, the rest is per item.
        fixed_ms = min(total_ms, 1000 * result.metrics["seconds"] / max(1, result.metrics["steps"])
                       * self.config.min_steps)
        memory.measure(self.name, "write_ms", fixed_ms)
        memory.measure(self.name, "write_ms_per_item", (total_ms - fixed_ms) / len(items))
        passed = set(result.passed(self.config.min_recall))
        mean = sum(result.recall.values()) / len(result.recall)
        resident = memory.loaded_model  # looked up before the transaction (for vllm: a server call)
        with memory.store.scoped(owner) as db:
            # The items first, in the strength the placements' foreign keys take anyway: a forget that
            # locked them (Memory.put replacing one) finishes first, instead of deadlocking with us.
            db.execute("SELECT id FROM items WHERE id = ANY(%s::bigint[]) ORDER BY id FOR KEY SHARE", (ids,))
            # Then their rows here, until the commit: a forget or demotion of these items waits for it,
            # then finds this adapter and deletes it; one that came first has removed the rows already.
            still = {r[0] for r in db.execute(
                "SELECT item_id FROM lora_items WHERE item_id = ANY(%s::bigint[]) ORDER BY item_id FOR UPDATE",
                (ids,)).fetchall()}
            if still != set(ids):
                log.info("lora: scope %s: %d item(s) left level 3 during training; the adapter is not kept",
                         scope_label, len(set(ids) - still))
                return []
            adapter_id = db.execute(
                """
                INSERT INTO lora_adapters (user_id, agent_id, session_id, artifact, bytes, fingerprint, item_ids,
                                           recall, metrics)
                VALUES (%s, %s, %s, '', 0, %s, %s, %s, %s) RETURNING id
                """,
                (u, a, s, fingerprint, ids, mean, Jsonb(_json_safe(result.metrics))),
            ).fetchone()[0]
            meta = {"adapter_id": adapter_id, "scope": list(key), "item_ids": ids,
                    "recall": {str(k): v for k, v in result.recall.items()}, "metrics": _json_safe(result.metrics)}
            weights, config = pack(result, fingerprint, meta)
            prefix = _artifact_prefix(fingerprint, key, adapter_id)
            for name, data_ in ((WEIGHTS_FILE, weights), (CONFIG_FILE, config)):
                memory.artifacts.put(f"{prefix}/{name}", data_)
                memory.store.on_rollback(db, functools.partial(memory.artifacts.delete, f"{prefix}/{name}"))
            db.execute("UPDATE lora_adapters SET artifact = %s, bytes = %s WHERE id = %s",
                       (prefix, len(weights) + len(config), adapter_id))
            db.execute(
                """
                UPDATE lora_items l SET adapter_id = %(id)s, recall = r.recall, passed = r.recall >= %(floor)s,
                    queued_for = NULL
                FROM unnest(%(ids)s::bigint[], %(recalls)s::real[]) AS r(item_id, recall)
                WHERE l.item_id = r.item_id
                """,
                {"id": adapter_id, "ids": list(result.recall), "recalls": list(result.recall.values()),
                 "floor": self.config.min_recall})
            self._prune(memory, db, key, adapter_id)
            if resident is not None:  # the version kept before this one leaves the model (or server) too
                for old_id, old_fp in db.execute(
                        "SELECT id, fingerprint FROM lora_adapters WHERE user_id = %s AND agent_id = %s "
                        "AND session_id = %s AND id < %s", (u, a, s, adapter_id)).fetchall():
                    memory.store.on_commit(db, functools.partial(resident.drop_adapter,
                                                                 adapter_name(self.name, old_id, old_fp)))
            m = result.metrics
            placed = [Placement(self.name, self.level, sorted(passed),
                                f"trained in {total_ms / 1000:.0f} s: {m['steps']} steps, {len(m['history'])} "
                                f"recall checks, stopped on {m['stopped']}")]
            failed = [i for i in ids if i not in passed]
            if failed:
                placed.append(Placement(self.name, self.level, failed, "not recalled: served by lower tiers",
                                        held=False))
            memory.place(db, placed, why)
        log.info("lora: scope %s adapter %d: %d/%d items recalled (mean %.2f), %.0f s, %d bytes",
                 scope_label, adapter_id, len(passed), len(items), mean, m["seconds"], len(weights))
        return placed

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
        resident = memory.loaded_model
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
        params["fp"] = memory.model_fingerprint
        # The most specific scope's newest adapter for the loaded model.
        row = db.execute(
            f"""
            SELECT a.id, a.user_id, a.agent_id, a.session_id, a.artifact, a.bytes, a.fingerprint
            FROM lora_adapters a
            WHERE {where} AND a.fingerprint = %(fp)s AND a.artifact <> '' AND NOT a.damaged
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
        loader = functools.partial(self._load, memory, Scope(u), adapter_id, prefix, fingerprint)
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

    def _load(self, memory, owner, adapter_id, prefix, fingerprint):
        model = memory.model
        model.max_adapters, model.max_adapter_bytes = self.resident, self.resident_bytes
        where = f"{memory.artifacts.uri(prefix)} (adapter {adapter_id})"
        try:
            weights = memory.artifacts.get(f"{prefix}/{WEIGHTS_FILE}")
            config = memory.artifacts.get(f"{prefix}/{CONFIG_FILE}")
            return unpack(weights, config, fingerprint, where)
        except (ArtifactCorrupt, ModelMismatch):
            self._damaged(memory, owner, adapter_id)
            raise
        except FileNotFoundError as e:
            self._damaged(memory, owner, adapter_id)
            raise ArtifactCorrupt(f"adapter {where} is missing a file ({e}); the next consolidation retrains it") \
                from e

    def _damaged(self, memory, owner, adapter_id):
        """Record in Postgres that an adapter failed to load: no process offers it again, and the next
        consolidation, in whichever process or worker, retrains it."""
        try:
            with memory.store.scoped(owner) as db:
                db.execute("UPDATE lora_adapters SET damaged = true WHERE id = %s", (adapter_id,))
        except Exception:  # noqa: BLE001 - the load's own error is the one to raise
            log.warning("lora: could not record adapter %s as damaged", adapter_id, exc_info=True)

    # -- forget -----------------------------------------------------------------------

    @hookimpl
    def memplug_forget(self, memory, scope, item_ids, db):
        """Every adapter version trained on a forgotten item goes at once; the rest retrain later."""
        # The items' rows first: a training being registered holds them locked, so this waits for
        # its commit, and the next statement then sees (and deletes) the adapter it registered.
        db.execute("DELETE FROM lora_items WHERE item_id = ANY(%s::bigint[])", (list(item_ids),))
        rows = db.execute(
            "DELETE FROM lora_adapters WHERE item_ids && %s::bigint[] RETURNING id, artifact, fingerprint",
            (list(item_ids),)).fetchall()
        self._delete(memory, db, rows)


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
