"""Postgres: connection, versioned migrations and the host's tables.

The host owns ``items`` (the source of truth), ``usage``, ``placements``,
``moves`` (the history of placements) and ``tier_costs`` (what each tier measured);
each tier migrates its own tables through :meth:`Store.migrate`. Everything
lives in the ``memplug`` schema so it can share a database with an application.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence

import psycopg
from psycopg import conninfo as _conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import ConfigError, StoreUnavailable

log = logging.getLogger(__name__)

SCHEMA = "memplug"

HOST_MIGRATIONS: tuple[str, ...] = (
    # 1: items, usage, placements
    """
    CREATE TABLE items (
        id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id      text NOT NULL,
        agent_id     text NOT NULL DEFAULT '',
        session_id   text NOT NULL DEFAULT '',
        role         text,
        text         text NOT NULL,
        metadata     jsonb NOT NULL DEFAULT '{}',
        content_hash bytea NOT NULL,
        tokens       integer NOT NULL,
        created_at   timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT items_scope_hash UNIQUE (user_id, agent_id, session_id, content_hash)
    );
    CREATE INDEX items_metadata ON items USING gin (metadata jsonb_path_ops);
    CREATE TABLE usage (
        item_id      bigint PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
        reads        integer NOT NULL DEFAULT 0,
        used         integer NOT NULL DEFAULT 0,
        last_read_at timestamptz,
        heat         double precision NOT NULL DEFAULT 0,
        heat_at      timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE placements (
        item_id   bigint NOT NULL REFERENCES items(id) ON DELETE CASCADE,
        tier      text NOT NULL,
        level     smallint NOT NULL,
        reason    text NOT NULL,
        placed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (item_id, tier)
    );
    CREATE INDEX placements_level ON placements (level, item_id);
    """,
    # 2: recent read times (for windowed policies), the history of moves, and measured tier costs
    """
    ALTER TABLE usage ADD COLUMN recent timestamptz[] NOT NULL DEFAULT '{}';
    CREATE TABLE moves (
        id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        item_id   bigint NOT NULL REFERENCES items(id) ON DELETE CASCADE,
        tier      text NOT NULL,
        level     smallint NOT NULL,
        held      boolean NOT NULL,
        reason    text NOT NULL,
        at        timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX moves_item ON moves (item_id, at);
    CREATE TABLE tier_costs (
        tier    text NOT NULL,
        metric  text NOT NULL,
        value   double precision NOT NULL,
        samples bigint NOT NULL,
        at      timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tier, metric)
    );
    """,
    # 3: caller keys (Memory.put): one item per key in a scope
    """
    ALTER TABLE items ADD COLUMN key text;
    CREATE UNIQUE INDEX items_scope_key ON items (user_id, agent_id, session_id, key) WHERE key IS NOT NULL;
    """,
)


def redact(dsn: str) -> str:
    """The DSN with any password replaced, safe for logs and error messages."""
    try:
        params = _conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    if "password" in params:
        params["password"] = "***"
    return _conninfo.make_conninfo(**params)


def _reason(exc: BaseException, dsn: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    password = _conninfo.conninfo_to_dict(dsn).get("password")
    if password:
        text = text.replace(str(password), "***")
    return text


class Store:
    """A pool of connections to one Postgres database, migrated for memplug."""

    def __init__(self, dsn: str, *, pool_size: int = 10, connect_timeout: int = 5):
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigError("the Postgres DSN is empty; set MEMPLUG_DSN or leave it unset for the embedded server")
        try:
            _conninfo.conninfo_to_dict(dsn)
            valid = True
        except psycopg.ProgrammingError:
            valid = False  # the parser's message quotes the DSN, password and all: not chained
        if not valid:
            raise ConfigError(
                "MEMPLUG_DSN is not a valid Postgres connection string "
                "(expected postgresql://user:password@host:port/dbname or key=value pairs)"
            )
        self.dsn = dsn
        self.safe_dsn = redact(dsn)
        self._kwargs = {
            "connect_timeout": connect_timeout,
            # JIT compilation costs far more than it saves on memplug's short queries.
            "options": f"-c search_path={SCHEMA},public -c jit=off",
            "application_name": "memplug",
        }
        self._bootstrap()
        self._callbacks: dict[int, tuple[list[Callable[[], None]], list[Callable[[], None]]]] = {}
        self.pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            kwargs=self._kwargs,
            configure=self._configure_connection,
            timeout=30,
            name="memplug",
            open=False,
        )
        try:
            self.pool.open(wait=True, timeout=connect_timeout + 5)
        except PoolTimeout as e:
            raise StoreUnavailable(f"cannot open connections to Postgres at {self.safe_dsn}") from e

    # -- connections ---------------------------------------------------------

    def connect(self, **kwargs) -> psycopg.Connection:
        """A new connection outside the pool (for bootstrap and tools)."""
        try:
            return psycopg.connect(self.dsn, **{**self._kwargs, **kwargs})
        except psycopg.OperationalError as e:
            raise StoreUnavailable(
                f"cannot reach Postgres at {self.safe_dsn}: {_reason(e, self.dsn)}. "
                "Check MEMPLUG_DSN, or unset it to use the embedded server."
            ) from None

    @staticmethod
    def _configure_connection(conn: psycopg.Connection) -> None:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        conn.commit()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """One transaction on a pooled connection: committed on success, rolled back on error."""
        try:
            with self.pool.connection() as conn:
                try:
                    with conn.transaction():
                        yield conn
                except BaseException:
                    self._finish(conn, committed=False)
                    raise
                self._finish(conn, committed=True)
        except PoolTimeout:
            raise StoreUnavailable(f"no connection to Postgres at {self.safe_dsn} became free in time") from None
        except psycopg.OperationalError as e:
            raise StoreUnavailable(
                f"lost the connection to Postgres at {self.safe_dsn}: {_reason(e, self.dsn)}"
            ) from e

    def on_commit(self, db: psycopg.Connection, fn: Callable[[], None]) -> None:
        """Run ``fn`` after the transaction of ``db`` commits (e.g. delete a forgotten blob)."""
        self._callbacks.setdefault(id(db), ([], []))[0].append(fn)

    def on_rollback(self, db: psycopg.Connection, fn: Callable[[], None]) -> None:
        """Run ``fn`` if the transaction of ``db`` rolls back (e.g. remove a blob written for it)."""
        self._callbacks.setdefault(id(db), ([], []))[1].append(fn)

    def _finish(self, conn: psycopg.Connection, committed: bool) -> None:
        after_commit, after_rollback = self._callbacks.pop(id(conn), ([], []))
        for fn in after_commit if committed else after_rollback:
            try:
                fn()
            except Exception as e:  # the transaction's outcome stands; a leftover file is only logged
                log.warning("after-%s action failed: %s", "commit" if committed else "rollback", e)

    def close(self) -> None:
        self.pool.close()

    # -- migrations ----------------------------------------------------------

    def _bootstrap(self) -> None:
        with self.connect(autocommit=True) as conn:
            # One migrator at a time across processes; the lock ends with the session.
            conn.execute("SELECT pg_advisory_lock(hashtext('memplug:migrate'))")
            try:
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                try:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg.Error as e:
                    raise StoreUnavailable(
                        f"Postgres at {self.safe_dsn} has no 'vector' extension and it could not be created "
                        f"({_reason(e, self.dsn)}). Install pgvector, or run CREATE EXTENSION vector as a superuser."
                    ) from None
                conn.execute(
                    """CREATE TABLE IF NOT EXISTS migrations (
                        component text NOT NULL,
                        version integer NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now(),
                        PRIMARY KEY (component, version))"""
                )
                self._apply(conn, "memplug", HOST_MIGRATIONS)
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext('memplug:migrate'))")

    def migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Apply ``migrations`` not yet applied for ``component``; return how many ran.

        Migration N (1-based) is ``migrations[N-1]``; append new ones, never edit old
        ones. Each runs in its own transaction, serialised across processes.
        """
        if not re.fullmatch(r"[a-z][a-z0-9_]*", component or ""):
            raise ConfigError(f"migration component {component!r} must be lower_snake_case")
        with self.connect(autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(hashtext('memplug:migrate'))")
            try:
                return self._apply(conn, component, migrations)
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext('memplug:migrate'))")

    @staticmethod
    def _apply(conn: psycopg.Connection, component: str, migrations: Sequence[str]) -> int:
        row = conn.execute(
            "SELECT coalesce(max(version), 0) FROM migrations WHERE component = %s", (component,)
        ).fetchone()
        done = row[0] if row else 0
        ran = 0
        for version, sql in enumerate(migrations, start=1):
            if version <= done:
                continue
            with conn.transaction():
                conn.execute(sql)
                conn.execute("INSERT INTO migrations (component, version) VALUES (%s, %s)", (component, version))
            ran += 1
        return ran
