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
    )

    @hookimpl
    def memplug_configure(self, memory):
        memory.store.migrate("pgvector", MIGRATIONS)
        self.mode = memory.option("pgvector_mode")
        self.text_config = memory.option("pgvector_text_config")
        self.candidates = memory.option("pgvector_candidates")
        self.postings = memory.option("pgvector_postings")
        self.ef_search = memory.option("pgvector_ef_search")
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
        vectors = memory.embedder.encode([it.text for it in knowledge])
        if vectors.ndim != 2 or vectors.shape[1] != DIM:
            raise ConfigError(f"the embedder returned vectors of shape {vectors.shape}; the pgvector tier needs {DIM}")
        u, a, s = scope.key
        with db.cursor() as cur:
            cur.executemany(
                "INSERT INTO pgvector_items (item_id, user_id, agent_id, session_id, embedding, tsv) "
                "VALUES (%s, %s, %s, %s, %s::halfvec, to_tsvector(%s::regconfig, %s))",
                [(it.id, u, a, s, np.asarray(v, dtype=np.float32), self.text_config, it.text)
                 for it, v in zip(knowledge, vectors, strict=True)],
            )
        if len(knowledge) >= ANALYZE_BATCH:
            self._refresh_statistics(db, knowledge[0].id, u, len(knowledge))
        return [Placement(self.name, self.level, [it.id for it in knowledge], "write")]

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
    def memplug_read(self, memory, scope, query, budget, filters, db):
        n = max(self.candidates, 2 * budget.k)
        where, params = visible_sql(scope, "p")
        if filters:
            where += " AND EXISTS (SELECT 1 FROM items f WHERE f.id = p.item_id AND f.metadata @> %(filters)s)"
            params["filters"] = Jsonb(filters)
        params.update(n=n, rrf=RRF_K)
        ctes, legs = [], []
        if self.mode in ("hybrid", "vector"):
            params["vec"] = memory.embedder.encode([query])[0]
            # pgvector takes ef_search up to 1000; larger reads rely on the iterative scan.
            db.execute(f"SET LOCAL hnsw.ef_search = {min(1000, max(self.ef_search, n))}")
            if self.iterative:
                db.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
            ctes.append(f"""vec AS (
                SELECT item_id, tsv, row_number() OVER (ORDER BY d) AS r FROM (
                    SELECT p.item_id, p.tsv, p.embedding <=> %(vec)s::halfvec AS d FROM pgvector_items p
                    WHERE {where} ORDER BY d LIMIT %(n)s) v)""")
            legs.append("SELECT item_id, r FROM vec")
        if self.mode in ("hybrid", "text"):
            posting = self._postings(db, query, params)
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
                legs.append("SELECT item_id, r FROM txt")
        if not legs:
            return None
        ctes.append(f"ranked AS ({' UNION ALL '.join(legs)})")
        rows = db.execute(
            f"""
            WITH {', '.join(ctes)},
            fused AS (SELECT item_id, sum(1.0 / (%(rrf)s + r)) AS score FROM ranked GROUP BY item_id)
            SELECT {ITEM_COLUMNS}, f.score FROM fused f JOIN items i ON i.id = f.item_id
            ORDER BY f.score DESC, i.id LIMIT %(n)s
            """,
            params,
            # Never a generic plan: each word's bound value is what lets the planner
            # choose between the GIN and the scope index.
            prepare=False,
        ).fetchall()
        return [Hit(item_from_row(r[:-1]), self.name, float(r[-1])) for r in rows]

    def _postings(self, db, query, params):
        """The ``posting`` CTE: up to ``postings`` items of the scope per query word.

        How many items a word drew estimates its document frequency, so rare words
        (codes, names) outweigh words the scope uses everywhere: an IDF over capped
        postings. Each word is its own lookup (``pgvector_postings``) with its own bound
        tsquery, so the planner sees its real frequency and picks the GIN index for rare words.
        """
        lexemes = db.execute(
            "SELECT coalesce(array_agg(DISTINCT lexeme ORDER BY lexeme), '{}') "
            "FROM unnest(to_tsvector(%s::regconfig, %s))",
            (self.text_config, query),
        ).fetchone()[0][:MAX_QUERY_WORDS]
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
    def memplug_forget(self, memory, scope, item_ids, db):
        db.execute("DELETE FROM pgvector_items WHERE item_id = ANY(%s::bigint[])", (list(item_ids),))
