"""A DSN's password never reaches a log, an error message, or the exceptions chained behind it."""

from __future__ import annotations

import logging
import traceback

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import conninfo

from memplug import ConfigError, Memory, MemplugError, Settings, StoreUnavailable
from memplug.cli import main

PASSWORD = "Pw-7f3Kq9zX"


def with_password(dsn: str, **changes: str) -> str:
    """``dsn`` with PASSWORD set (the embedded server trusts its socket, so any password is accepted)."""
    return conninfo.make_conninfo(dsn, password=PASSWORD, **changes)


def exception_text(exc: BaseException) -> str:
    """Everything an exception can show: the formatted traceback with every cause and context,
    and the str, repr and args of each exception in the chain."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        parts += [str(e), repr(e), repr(e.args)]
        stack += [e.__cause__, e.__context__]
    return "\n".join(parts)


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)  # every logger, every level: psycopg, psycopg_pool, memplug
    return caplog


def assert_no_password(text: str) -> None:
    assert PASSWORD not in text


@pytest.mark.parametrize("bad", [
    f"postgresql://app:{PASSWORD}%ZZ@127.0.0.1/db",  # a bad percent-escape: the parser quotes the password
    f"postgresql://app:{PASSWORD}@[::1/db",
    f"host=127.0.0.1 password={PASSWORD} junk",
    f"host=127.0.0.1 password='{PASSWORD}",
])
def test_invalid_dsn_errors_hide_the_password(bad, logs):
    with pytest.raises(ConfigError, match="not a valid Postgres connection string") as e:
        Memory(bad, load_entrypoints=False)
    assert_no_password(exception_text(e.value))
    assert_no_password(logs.text)


@pytest.mark.parametrize("where", [
    "postgresql://app:{pw}@127.0.0.1:1/nowhere?connect_timeout=2",  # refused
    "postgresql://app:{pw}@no-such-host.invalid/db?connect_timeout=2",  # unresolvable
    "postgresql://app:{pw}@127.0.0.1:notaport/db",  # parses, but libpq refuses it
    "postgresql://app:{pw}@127.0.0.1/db?sslmode=bogus",
])
def test_unreachable_postgres_errors_hide_the_password(where, logs):
    with pytest.raises(StoreUnavailable) as e:
        Memory(where.format(pw=PASSWORD), load_entrypoints=False)
    assert "password=***" in str(e.value)
    assert_no_password(exception_text(e.value))
    assert_no_password(logs.text)


@pytest.mark.parametrize("change", [{"dbname": "no_such_db"}, {"user": "no_such_role"}])
def test_a_real_server_refusing_the_login_hides_the_password(dsn, change, logs):
    with pytest.raises(StoreUnavailable, match="does not exist") as e:
        Memory(with_password(dsn, **change), load_entrypoints=False)
    assert_no_password(exception_text(e.value))
    assert_no_password(logs.text)


def test_working_memory_never_shows_the_password(dsn, user, logs):
    secret_dsn = with_password(dsn)
    with Memory(secret_dsn) as mem:
        mem.write(user, "The password of the database is not this note.")
        mem.read(user, "database")
        stats = mem.stats(user)
        assert stats["store"].count("***") == 1
        assert_no_password(repr(stats))
        assert_no_password(repr(mem.settings))
        assert_no_password(repr(Settings(dsn=secret_dsn)))
    assert_no_password(logs.text)


def test_losing_the_connection_mid_transaction_hides_the_password(dsn, user, logs):
    with Memory(with_password(dsn)) as mem:
        with pytest.raises(StoreUnavailable, match="lost the connection") as e, mem.store.transaction() as db:
            pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            db.execute("SELECT 1")
        assert isinstance(e.value, MemplugError)
        assert_no_password(exception_text(e.value))
        mem.write(user, "The pool replaced the lost connection.")  # and it still works
    assert_no_password(logs.text)


def test_command_line_output_hides_the_password(dsn, user, monkeypatch):
    monkeypatch.setenv("MEMPLUG_DSN", with_password(dsn))
    runner = CliRunner()
    for args in (["write", user, "hello"], ["stats", "--json"], ["doctor", "--json"], ["stats"]):
        result = runner.invoke(main, args, catch_exceptions=False)
        assert_no_password(result.output)
        assert "***" in result.output or args[0] == "write"
    monkeypatch.setenv("MEMPLUG_DSN", f"postgresql://app:{PASSWORD}@127.0.0.1:1/x?connect_timeout=2")
    result = runner.invoke(main, ["stats"], catch_exceptions=False)
    assert result.exit_code == 2 and "StoreUnavailable" in result.output
    assert_no_password(result.output)
