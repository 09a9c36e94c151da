"""Postgres: connection, versioned migrations and the host's tables.

The host owns ``items`` (the source of truth), ``usage``, ``placements``,
``moves`` (the history of placements) and ``tier_costs`` (what each tier measured);
each tier migrates its own tables through :meth:`Store.migrate`. Everything
lives in the ``memplug`` schema so it can share a database with an application.

Row-level security holds the boundary between users in Postgres itself. Work
for one user runs in :meth:`Store.scoped`, as the role ``memplug_app`` with the
setting ``memplug.user_id``; every table holding users' data is confined by a
policy (:func:`row_security`), so even a query without a WHERE clause sees that
user's rows only. :meth:`Store.transaction` runs as the tables' owner, which
row-level security does not restrict: for migrations, admin tools and work that
spans users.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence

import psycopg
from psycopg import conninfo as _conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import ConfigError, ScopeViolation, StoreUnavailable
from .types import Scope

log = logging.getLogger(__name__)

SCHEMA = "memplug"
# The role scoped transactions take: it owns nothing and cannot bypass row-level security.
APP_ROLE = "memplug_app"
# The transaction-local setting naming the user a scoped transaction may see.
USER_SETTING = "memplug.user_id"


def row_security(table: str, by: str = "user_id") -> str:
    """SQL that confines ``table`` to the user of a scoped transaction, for a tier's migrations.

    ``by="user_id"``: the table has a ``user_id`` column naming the row's owner; if it
    also has an ``item_id`` column, a row may only be written for an item the same
    user owns. ``by="item_id"``: the table has an ``item_id`` column and a row
    belongs to the owner of that item. The SQL enables row-level security on the
    table (and on each of its partitions, which a query can name directly), lets
    scoped transactions (role ``memplug_app``) read and write only the rows of
    ``current_setting('memplug.user_id')``, and grants them the table. Append it as a
    new migration: ``MIGRATIONS = (..., row_security("my_table"))``. Work outside a
    scope (:meth:`Store.transaction`) runs as the tables' owner and sees every row.
    Shipped migrations embed this text: change the policy only in a new function.
    """
    if not isinstance(table, str) or not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", table):
        raise ConfigError(f"row_security: table {table!r} must be a lower_snake_case name without schema")
    if by not in ("user_id", "item_id"):
        raise ConfigError(f"row_security: by={by!r}; expected 'user_id' or 'item_id' (the column naming the owner)")
    # format() templates, written inside SQL string literals; %1$I is the table or partition.
    user = f"%1$I.user_id = current_setting(''{USER_SETTING}'', true)"
    item = (f"EXISTS (SELECT 1 FROM {SCHEMA}.items o WHERE o.id = %1$I.item_id "
            f"AND o.user_id = current_setting(''{USER_SETTING}'', true))")
    if by == "user_id":
        policy = f"""reads := format('{user}', name);
            writes := reads || CASE WHEN has_item THEN format(' AND {item}', name) ELSE '' END;"""
    else:
        policy = f"""reads := format('{item}', name);
            writes := reads;"""
    return f"""
    DO $$ DECLARE
        root regclass := '{SCHEMA}.{table}'::regclass;
        has_item boolean := EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = root AND attname = 'item_id'
                                    AND attnum > 0 AND NOT attisdropped);
        part regclass; name text; reads text; writes text;
    BEGIN
        FOR part, name IN SELECT c.oid::regclass, c.relname FROM pg_class c
                          WHERE c.oid = root OR c.oid IN (SELECT relid FROM pg_partition_tree(root)) LOOP
            {policy}
            EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', part);
            EXECUTE format('CREATE POLICY memplug_scope ON %s TO {APP_ROLE} USING (%s) WITH CHECK (%s)',
                           part, reads, writes);
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO {APP_ROLE}', part);
            IF current_setting('server_version_num')::int >= 170000 THEN  -- a tier may ANALYZE its tables
                EXECUTE format('GRANT MAINTAIN ON %s TO {APP_ROLE}', part);
            END IF;
        END LOOP;
    END $$;
    """


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
    # 4: row-level security. Scoped transactions run as APP_ROLE, which sees one user's rows only.
    f"""
    DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
            BEGIN
                CREATE ROLE {APP_ROLE} NOLOGIN NOINHERIT NOBYPASSRLS;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;  -- another database made it
            END;
        END IF;
        IF NOT pg_has_role(current_user, '{APP_ROLE}', 'MEMBER') THEN
            EXECUTE format('GRANT {APP_ROLE} TO %I', current_user);
        END IF;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'memplug needs the role {APP_ROLE} and cannot create it; ask an administrator to run: CREATE ROLE {APP_ROLE} NOLOGIN; GRANT {APP_ROLE} TO %;',
            quote_ident(current_user);
    END $$;
    GRANT USAGE ON SCHEMA {SCHEMA} TO {APP_ROLE};
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {SCHEMA} TO {APP_ROLE};
    GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {SCHEMA} TO {APP_ROLE};
    -- Tables that tiers create later are usable by scoped work; each tier confines its own with row_security().
    ALTER DEFAULT PRIVILEGES IN SCHEMA {SCHEMA} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {APP_ROLE};
    ALTER DEFAULT PRIVILEGES IN SCHEMA {SCHEMA} GRANT USAGE, SELECT ON SEQUENCES TO {APP_ROLE};
    REVOKE ALL ON migrations FROM {APP_ROLE};
    """
    + row_security("items")
    + row_security("usage", by="item_id")
    + row_security("placements", by="item_id")
    + row_security("moves", by="item_id"),
    # 5: when an item's event happened (a turn's time), apart from when it was written; items of a
    # scope in the order they were written (a tier can read an item's neighbours)
    """
    ALTER TABLE items ADD COLUMN occurred_at timestamptz;
    CREATE INDEX items_scope_order ON items (user_id, agent_id, session_id, id);
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
        """One unscoped transaction on a pooled connection: committed on success, rolled back on error.

        It runs as the tables' owner and sees every user's rows: for migrations,
        admin tools and work that spans users (``stats()`` of the whole store).
        Work for one user goes through :meth:`scoped`.
        """
        with self._transaction(None) as conn:
            yield conn

    @contextlib.contextmanager
    def scoped(self, scope: Scope | str, durable: bool = True) -> Iterator[psycopg.Connection]:
        """One transaction confined by row-level security to the rows of one user.

        ``scope`` is a :class:`Scope` (or its string form); its ``user_id`` counts.
        The transaction runs as role ``memplug_app`` with ``memplug.user_id`` set, so a
        query on a confined table (see :func:`row_security`) sees only that user's rows
        even without a WHERE clause, and writing another user's row raises
        :class:`ScopeViolation` (the transaction is rolled back). ``durable=False``
        commits without waiting for the disk (``synchronous_commit = off``): for work
        whose writes are statistics, such as a read counting its hits; a crash may lose
        the last moments of them, never leave them half-written.
        """
        with self._transaction(Scope.of(scope).user_id, durable) as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self, user_id: str | None, durable: bool = True) -> Iterator[psycopg.Connection]:
        try:
            with self.pool.connection() as conn:
                try:
                    with conn.transaction():
                        if user_id is not None:
                            conn.execute("SELECT set_config('role', %s, true), set_config(%s, %s, true)"
                                         + ("" if durable else ", set_config('synchronous_commit', 'off', true)"),
                                         (APP_ROLE, USER_SETTING, user_id))
                        yield conn
                except BaseException as e:
                    self._finish(conn, committed=False)
                    if user_id is not None and isinstance(e, psycopg.errors.InsufficientPrivilege):
                        raise ScopeViolation(
                            f"work scoped to user {user_id!r} reached beyond that user's rows and was refused; "
                            f"nothing was written ({_reason(e, self.dsn)})") from e
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
            try:
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO migrations (component, version) VALUES (%s, %s)", (component, version))
            except psycopg.Error as e:
                if isinstance(e, psycopg.OperationalError):
                    raise
                raise StoreUnavailable(f"migration {version} of {component!r} failed: {e}") from e
            ran += 1
        return ran
