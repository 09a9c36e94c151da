"""Tier ``pgvector`` (level 1): every knowledge item as an embedding and a full-text vector.

Items are embedded in batches with all-MiniLM-L6-v2 and stored as ``halfvec(384)``
(half the bytes of ``vector``, for a cosine error around 1e-3) with an HNSW index
in a table hash-partitioned by user, and indexed for Postgres full-text search (tsvector + GIN). A read
runs both searches in one query, confined to the scope, and fuses the two
rankings by reciprocal rank: exact rare words (codes, names) that the embedding
blurs are still found.

Options: ``pgvector_mode`` (``hybrid``, ``vector`` or ``text``),
``pgvector_text_config`` (a Postgres text-search configuration, default
``english``), ``pgvector_candidates`` (per search, default 40), ``pgvector_postings`` (items
sampled per query word to estimate its rarity, default 64).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from psycopg.types.json import Jsonb

from memplug.plugin import (
    APP_ROLE,
    ITEM_COLUMNS,
    RRF_K,
    SCHEMA,
    USER_SETTING,
    ConfigError,
    Hit,
    Option,
    Placement,
    StoreUnavailable,
    TierCost,
    hookimpl,
    item_from_row,
    row_security,
    visible_sql,
    window_sql,
)

DIM = 384
PARTITIONS = 16
MIGRATIONS = (
    # Hash-partitioned by user: a read names its user, so it searches one partition,
    # whose HNSW graph other tenants' vectors crowd sixteen times less.
    f"""
    CREATE TABLE pgvector_items (
        item_id    bigint NOT NULL REFERENCES items(id) ON DELETE CASCADE,
        user_id    text NOT NULL,
        agent_id   text NOT NULL,
        session_id text NOT NULL,
        embedding  halfvec({DIM}) NOT NULL,
        tsv        tsvector NOT NULL,
        PRIMARY KEY (item_id, user_id)
    ) PARTITION BY HASH (user_id);
    DO $$ BEGIN
        FOR r IN 0..{PARTITIONS - 1} LOOP
            EXECUTE format('CREATE TABLE pgvector_items_p%s PARTITION OF pgvector_items '
                           'FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER %s)', r, r);
        END LOOP;
    END $$;
    CREATE INDEX pgvector_items_scope ON pgvector_items (user_id, agent_id, session_id);
    CREATE INDEX pgvector_items_hnsw ON pgvector_items USING hnsw (embedding halfvec_cosine_ops);
    -- No pending list: searches need not scan it; the HNSW insert dominates write cost anyway.
    CREATE INDEX pgvector_items_tsv ON pgvector_items USING gin (tsv) WITH (fastupdate = off);
    """,
    # 2: a scoped transaction sees its own user's rows only (on the table and on each partition).
    # Row-level security keeps non-leakproof operators such as @@ out of index conditions, so a
    # full-text lookup under it scans the user's whole partition. pgvector_postings() finds one
    # word's postings through the GIN index as the table's owner, confined to the scoped user:
    # called in a scoped transaction for any other user it raises instead of answering.
    row_security("pgvector_items") + f"""
    CREATE FUNCTION pgvector_postings(q tsquery, u text, a text, s text, filters jsonb, n integer)
    RETURNS TABLE (item_id bigint, tsv tsvector)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = {SCHEMA}, pg_temp AS $$
    BEGIN
        IF current_setting('role') <> 'none' AND u IS DISTINCT FROM current_setting('{USER_SETTING}', true) THEN
            RAISE EXCEPTION 'pgvector_postings: user % is outside this transaction''s scope', u
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        -- EXECUTE plans with the bound word: the planner sees its frequency and picks GIN or the scope index.
        RETURN QUERY EXECUTE
            'SELECT p.item_id, p.tsv FROM pgvector_items p WHERE p.tsv @@ $1 AND p.user_id = $2 '
            'AND p.agent_id IN ('''', $3) AND p.session_id IN ('''', $4) AND ($5 IS NULL OR EXISTS '
            '(SELECT 1 FROM items f WHERE f.id = p.item_id AND f.metadata @> $5)) LIMIT $6'
            USING q, u, a, s, filters, n;
    END $$;
    REVOKE ALL ON FUNCTION pgvector_postings(tsquery, text, text, text, jsonb, integer) FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION pgvector_postings(tsquery, text, text, text, jsonb, integer) TO {APP_ROLE};
    """,
)
MODES = ("hybrid", "vector", "text")
# What an item's index can carry beside its text (option pgvector_index).
INDEX_PARTS = ("speaker", "date", "previous")
NEIGHBOUR_CHARS = 300  # of each previous turn, in a turn's index
MAX_QUERY_WORDS = 32
ANALYZE_BATCH = 100


class PgVectorTier:
    """Long-term knowledge with hybrid (vector + full-text) search."""

    name = "pgvector"
    level = 1
    options = (
        Option("pgvector_mode", str, "hybrid", "What a read searches: hybrid (vector and full text, fused), "
               "vector or text.", choices=MODES),
        Option("pgvector_text_config", str, "english", "The Postgres text-search configuration of the "
               "full-text leg."),
        Option("pgvector_candidates", int, 40, "Candidates each search leg returns (at least 2 x Budget.k).",
               min=1),
        Option("pgvector_postings", int, 64, "Items sampled per query word to estimate its rarity.", min=1),
        Option("pgvector_ef_search", int, 100, "HNSW search breadth (hnsw.ef_search), raised to the candidates "
               "if they are more.", min=1, max=1000),
        Option("pgvector_index", str, "speaker", "What a conversation turn (an item whose metadata names its "
               "'speaker') is found by beside its text, comma-separated: speaker (its speaker), date (its "
               "occurred_at), previous (the turns before it in its scope). A read still returns the stored "
               "text. After a change, `memplug reindex` brings existing items up to date.", metavar="PARTS"),
        Option("pgvector_vector_weight", float, 1.0, "Weight of the vector leg's ranks against the full-text "
               "leg's (1) in a hybrid read's fusion.", min=0, max=10),
        Option("pgvector_supersede", float, 0.0, "Similarity (cosine, between two hits) at which the newer of "
               "two items found for a query counts as updating the older, and ranks just before it: 'I moved "
               "to Porto' before 'I live in Lisbon'. Newer: a later occurred_at (else written later). 0: off.",
               min=0, max=1),
        Option("pgvector_neighbours", int, 1, "Turns before a turn that its index carries (with "
               "pgvector_index=previous).", min=1, max=8),
    )

    @hookimpl
    def memplug_configure(self, memory):
        memory.store.migrate("pgvector", MIGRATIONS)
        self.mode = memory.option("pgvector_mode")
        self.text_config = memory.option("pgvector_text_config")
        self.candidates = memory.option("pgvector_candidates")
        self.postings = memory.option("pgvector_postings")
        self.ef_search = memory.option("pgvector_ef_search")
        self.index = tuple(p.strip() for p in memory.option("pgvector_index").split(",") if p.strip())
        unknown = sorted(set(self.index) - set(INDEX_PARTS))
        if unknown:
            raise ConfigError(f"pgvector_index names {', '.join(map(repr, unknown))}; the parts are "
                              f"{', '.join(INDEX_PARTS)}")
        self.neighbours = memory.option("pgvector_neighbours")
        self.supersede = memory.option("pgvector_supersede")
        self.vector_weight = memory.option("pgvector_vector_weight")
        with memory.store.transaction() as db:
            if not db.execute("SELECT 1 FROM pg_ts_config WHERE cfgname = %s", (self.text_config,)).fetchone():
                raise ConfigError(f"pgvector_text_config={self.text_config!r} is not a text search configuration")
            version = db.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
        have = tuple(int(x) for x in version.split(".")[:2])
        if have < (0, 7):
            raise StoreUnavailable(f"the pgvector tier needs pgvector >= 0.7 (halfvec); the database has {version}")
        # Iterative index scans (pgvector >= 0.8) keep filtered HNSW searches from coming up short.
        self.iterative = have >= (0, 8)

    @hookimpl
    def memplug_write(self, memory, scope, items, db):
        knowledge = [it for it in items if it.role is None]
        if not knowledge:
            return None
        texts = self.index_texts(db, scope, knowledge)
        vectors = memory.embedder.encode(texts)
        if vectors.ndim != 2 or vectors.shape[1] != DIM:
            raise ConfigError(f"the embedder returned vectors of shape {vectors.shape}; the pgvector tier needs {DIM}")
        u, a, s = scope.key
        with db.cursor() as cur:
            cur.executemany(
                "INSERT INTO pgvector_items (item_id, user_id, agent_id, session_id, embedding, tsv) "
                "VALUES (%s, %s, %s, %s, %s::halfvec, to_tsvector(%s::regconfig, %s))",
                [(it.id, u, a, s, np.asarray(v, dtype=np.float32), self.text_config, text)
                 for it, v, text in zip(knowledge, vectors, texts, strict=True)],
            )
        if len(knowledge) >= ANALYZE_BATCH:
            self._refresh_statistics(db, knowledge[0].id, u, len(knowledge))
        return [Placement(self.name, self.level, [it.id for it in knowledge], "write")]

    def index_texts(self, db, scope, items):
        """What each item is found by: its text, and for a conversation turn (metadata ``speaker``) the
        parts ``pgvector_index`` names. Its own words come first: the embedder reads a bounded prefix."""
        if not self.index:
            return [it.text for it in items]
        before: list[str] = []
        if "previous" in self.index and any(_speaker(it) for it in items):
            rows = db.execute(
                "SELECT i.text, i.metadata->>'speaker' FROM items i WHERE i.user_id = %s AND i.agent_id = %s "
                "AND i.session_id = %s AND i.role IS NULL AND i.id < %s AND i.metadata ? 'speaker' "
                "ORDER BY i.id DESC LIMIT %s",
                (*scope.key, min(it.id for it in items), self.neighbours)).fetchall()
            before = [self._said(speaker, text) for text, speaker in reversed(rows)]
        out = []
        for it in items:
            speaker = _speaker(it)
            if not speaker:
                out.append(it.text)
                continue
            parts = [self._said(speaker, it.text, full=True)]
            if "date" in self.index and it.occurred_at is not None:
                parts.append(it.occurred_at.strftime("(%A %d %B %Y)"))
            if "previous" in self.index and before:
                parts.append("after " + " / ".join(before[-self.neighbours:]))
            out.append("\n".join(parts))
            before.append(self._said(speaker, it.text))
        return out

    def _said(self, speaker, text, full=False):
        text = text if full else text[:NEIGHBOUR_CHARS]
        return f"{speaker}: {text}" if "speaker" in self.index else text

    @staticmethod
    def _refresh_statistics(db, item_id, user_id, added):
        """ANALYZE the user's partition when a bulk write outgrows its statistics.

        Reads choose between the GIN and the scope index by word frequencies; a
        partition filled faster than autovacuum samples it would be read with an
        empty-table guess. ANALYZE counts this transaction's own rows.
        """
        part, analysed = db.execute(
            "SELECT c.oid::regclass::text, c.reltuples FROM pgvector_items p JOIN pg_class c ON c.oid = p.tableoid "
            "WHERE p.item_id = %s AND p.user_id = %s", (item_id, user_id)).fetchone()
        if analysed < 0 or added > 0.2 * analysed:
            db.execute(f"ANALYZE {part}")

    @hookimpl
    def memplug_footprint(self, memory, item_ids, db):
        rows = db.execute("SELECT p.item_id, pg_column_size(p.embedding) + pg_column_size(p.tsv) "
                          "FROM pgvector_items p WHERE p.item_id = ANY(%s::bigint[])", (list(item_ids),)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    @hookimpl
    def memplug_costs(self, memory, scope):
        """A text item costs its tokens in every prompt it is read into (the policy prices a
        prompt token); every item is written here anyway, so there is no write cost."""
        return TierCost(self.name, self.level, prompt_tokens_per_token=1.0)

    @hookimpl
    def memplug_read(self, memory, scope, query, budget, filters, window, db):
        n = max(self.candidates, 2 * budget.k)
        where, params = visible_sql(scope, "p")
        when, times = window_sql(window, "f")
        if filters or window:
            where += (" AND EXISTS (SELECT 1 FROM items f WHERE f.id = p.item_id"
                      + (" AND f.metadata @> %(filters)s" if filters else "") + f" AND {when})")
            params.update(times, filters=Jsonb(filters) if filters else None)
        params.update(n=n, rrf=RRF_K, vector_weight=self.vector_weight)
        ctes, legs = [], []
        lexemes = self._prepare(db, query, n)
        if self.mode in ("hybrid", "vector"):
            params["vec"] = memory.embedder.encode([query])[0]
            ctes.append(f"""vec AS (
                SELECT item_id, tsv, row_number() OVER (ORDER BY d) AS r FROM (
                    SELECT p.item_id, p.tsv, p.embedding <=> %(vec)s::halfvec AS d FROM pgvector_items p
                    WHERE {where} ORDER BY d LIMIT %(n)s) v)""")
            legs.append("SELECT item_id, r, %(vector_weight)s::float AS w FROM vec")
        if self.mode in ("hybrid", "text"):
            posting = self._postings(lexemes, params)
            if posting:
                # Every candidate (from the postings or the vector leg) is scored on every
                # query word it contains, so an item matching several moderately common
                # words is credited even when no capped posting list drew it. Candidates carry
                # their tsvector: matching it needs no second lookup in pgvector_items, where
                # row-level security would keep @@ from using an index.
                drawn = "SELECT item_id, tsv FROM posting" + (" UNION ALL SELECT item_id, tsv FROM vec" if legs else "")
                candidates = f"SELECT DISTINCT ON (item_id) item_id, tsv FROM ({drawn}) d"
                ctes += [posting,
                         "df AS (SELECT lexeme, tq, count(*) AS df FROM posting GROUP BY lexeme, tq)",
                         f"""txt AS (
                    SELECT item_id, row_number() OVER (ORDER BY s DESC, item_id) AS r FROM (
                        SELECT c.item_id, sum(ln(1 + %(postings)s::float / df.df)) AS s
                        FROM ({candidates}) c
                        JOIN df ON c.tsv @@ df.tq
                        GROUP BY c.item_id ORDER BY s DESC, c.item_id LIMIT %(n)s) t)"""]
                legs.append("SELECT item_id, r, 1.0::float AS w FROM txt")
        if not legs:
            return None
        ctes.append(f"ranked AS ({' UNION ALL '.join(legs)})")
        # Relevance: the cosine similarity to the query, on every candidate (the text leg's too).
        relevance = "1 - (p.embedding <=> %(vec)s::halfvec)" if "vec" in params else "NULL::float"
        rows = db.execute(
            f"""
            WITH {', '.join(ctes)},
            fused AS (SELECT item_id, sum(w / (%(rrf)s + r)) AS score FROM ranked GROUP BY item_id)
            SELECT {ITEM_COLUMNS}, {"p.embedding" if self.supersede else "NULL"}, f.score, {relevance}
            FROM fused f JOIN items i ON i.id = f.item_id
            JOIN pgvector_items p ON p.item_id = f.item_id AND p.user_id = %(scope_user)s
            WHERE {window_sql(window, "i")[0]}
            ORDER BY f.score DESC, i.id LIMIT %(n)s
            """,
            params,
            # Never a generic plan: each word's bound value is what lets the planner
            # choose between the GIN and the scope index.
            prepare=False,
        ).fetchall()
        hits = [Hit(item_from_row(r), self.name, float(r[-2]), relevance=r[-1]) for r in rows]
        if self.supersede and len(hits) > 1:
            hits = newer_first(hits, np.array([r[-3].to_numpy() for r in rows], dtype=np.float32), self.supersede)
        return hits

    def _prepare(self, db, query, n):
        """Set the vector search's breadth and take the query's words, in one round trip."""
        settings = []
        if self.mode in ("hybrid", "vector"):
            # pgvector takes ef_search up to 1000; larger reads rely on the iterative scan.
            settings.append(("hnsw.ef_search", str(min(1000, max(self.ef_search, n)))))
            if self.iterative:
                settings.append(("hnsw.iterative_scan", "relaxed_order"))
        words = self.mode in ("hybrid", "text")
        columns = ["set_config(%s, %s, true)" for _ in settings]
        columns.append("(SELECT coalesce(array_agg(DISTINCT lexeme ORDER BY lexeme), '{}') "
                       "FROM unnest(to_tsvector(%s::regconfig, %s)))" if words else "NULL")
        values = [v for pair in settings for v in pair] + ([self.text_config, query] if words else [])
        return (db.execute("SELECT " + ", ".join(columns), values).fetchone()[-1] or [])[:MAX_QUERY_WORDS]

    def _postings(self, lexemes, params):
        """The ``posting`` CTE: up to ``postings`` items of the scope per query word.

        How many items a word drew estimates its document frequency, so rare words
        (codes, names) outweigh words the scope uses everywhere: an IDF over capped
        postings. Each word is its own lookup (``pgvector_postings``) with its own bound
        tsquery, so the planner sees its real frequency and picks the GIN index for rare words.
        """
        if not lexemes:
            return None
        params["postings"] = self.postings
        params.setdefault("filters", None)
        parts = []
        for n, lexeme in enumerate(lexemes):
            params[f"lx{n}"] = lexeme
            # One quoted lexeme: tsquery syntax, no parsing or stemming of its own.
            params[f"tq{n}"] = "'" + lexeme.replace("\\", "\\\\").replace("'", "\\'") + "'"
            parts.append(
                f"(SELECT t.item_id, t.tsv, %(lx{n})s::text AS lexeme, %(tq{n})s::tsquery AS tq FROM pgvector_postings("
                f"%(tq{n})s::tsquery, %(scope_user)s, %(scope_agent)s, %(scope_session)s, %(filters)s::jsonb, "
                f"%(postings)s) AS t)"
            )
        return "posting AS (" + " UNION ALL ".join(parts) + ")"

    @hookimpl
    def memplug_reindex(self, memory, scope, items, db):
        knowledge = [it for it in items if it.role is None]
        held = {r[0] for r in db.execute("SELECT item_id FROM pgvector_items WHERE item_id = ANY(%s::bigint[])",
                                         ([it.id for it in knowledge],)).fetchall()}
        knowledge = [it for it in knowledge if it.id in held]
        if not knowledge:
            return 0
        texts = self.index_texts(db, scope, knowledge)
        vectors = memory.embedder.encode(texts)
        with db.cursor() as cur:
            cur.executemany(
                "UPDATE pgvector_items SET embedding = %s::halfvec, tsv = to_tsvector(%s::regconfig, %s) "
                "WHERE item_id = %s AND user_id = %s",
                [(np.asarray(v, dtype=np.float32), self.text_config, text, it.id, scope.user_id)
                 for it, v, text in zip(knowledge, vectors, texts, strict=True)])
        return len(knowledge)

    @hookimpl
    def memplug_forget(self, memory, scope, item_ids, db):
        db.execute("DELETE FROM pgvector_items WHERE item_id = ANY(%s::bigint[])", (list(item_ids),))


def newer_first(hits, vectors, threshold):
    """``hits`` with each one that updates a better-ranked hit moved just before it.

    Hit ``b`` updates hit ``a`` when it happened later and their vectors' cosine
    similarity is at least ``threshold``. Scores are rewritten to keep the order.
    """
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similar = unit @ unit.T >= threshold
    when = [h.item.when for h in hits]
    order: list[int] = []
    for a in range(len(hits)):
        if a in order:
            continue
        order += [b for b in range(a + 1, len(hits)) if b not in order and similar[a, b]
                  and when[a] is not None and when[b] is not None and when[b] > when[a]]
        order.append(a)
    top = hits[0].score
    return [replace(hits[i], score=top * (1 - n / (10 * len(hits)))) for n, i in enumerate(order)]


def _speaker(item):
    speaker = item.metadata.get("speaker")
    return speaker.strip() if isinstance(speaker, str) else ""
