"""API keys of the servers: bound to a user or a prefix of users, stored hashed, revocable, out of
reach of scoped work; and the per-key rate limit."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from memplug import (
    AccessDenied,
    InvalidInput,
    InvalidScope,
    NotFound,
    RateLimited,
    ScopeViolation,
    Unauthenticated,
)
from memplug.cli import main
from memplug.server.keys import create_key, list_keys, revoke_key, verify_key
from memplug.server.limits import RateLimiter
from memplug.store import Store


@pytest.fixture(scope="module")
def store(dsn):
    s = Store(dsn, pool_size=2)
    yield s
    s.close()


def test_a_key_is_stored_as_a_digest_and_verifies_until_revoked(store, user):
    key, token = create_key(store, user=user, name="laptop")
    assert token.startswith(f"mpk_{key.id}_") and len(token) == 4 + 12 + 1 + 43
    assert verify_key(store, token) == key
    with store.transaction() as db:  # nowhere in the table, in any form
        rows = db.execute("SELECT * FROM api_keys WHERE id = %s", (key.id,)).fetchall()
    secret = token.rsplit("_", 1)[1]
    assert rows and all(secret not in str(v) and token not in str(v) for v in rows[0])
    listed = {k.id: k for k in list_keys(store)}
    assert listed[key.id].covers == user and listed[key.id].revoked_at is None

    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(Unauthenticated, match="unknown API key") as e:
        verify_key(store, tampered)
    assert secret not in str(e.value)
    revoked = revoke_key(store, key.id)
    assert revoked.revoked_at is not None
    assert revoke_key(store, key.id).revoked_at == revoked.revoked_at  # again: nothing changes
    with pytest.raises(Unauthenticated, match="revoked"):
        verify_key(store, token)


@pytest.mark.parametrize("token", [None, "", "Bearer x", "mpk_123_abc", "mpk_" + "g" * 12 + "_" + "a" * 43,
                                   "mpk_" + "a" * 12 + "_" + "a" * 42, 42])
def test_malformed_keys_are_refused_without_quoting_them(store, token):
    with pytest.raises(Unauthenticated, match="malformed") as e:
        verify_key(store, token)
    assert not token or str(token) not in str(e.value)


def test_a_key_covers_its_user_or_its_prefix_and_nothing_else(store, user):
    key, _ = create_key(store, user=user)
    assert key.check(f"{user}/helper/s1").user_id == user
    with pytest.raises(AccessDenied, match=f"covers user\\(s\\) {user}, not 'bob'"):
        key.check("bob")
    group, _ = create_key(store, prefix=f"{user}-")
    assert group.covers == f"{user}-*"
    assert group.allows(f"{user}-bob") and group.allows(f"{user}-x.y")
    assert not group.allows(user) and not group.allows(f"{user}-") and not group.allows(f"{user}corp")
    with pytest.raises(AccessDenied):
        group.check(f"{user}corp-bob")


@pytest.mark.parametrize("kwargs, error, words", [
    ({}, InvalidInput, "give one of them"),
    ({"user": "alice", "prefix": "acme-"}, InvalidInput, "give one of them"),
    ({"prefix": "acme"}, InvalidInput, "must end with one of"),
    ({"prefix": "-acme-"}, InvalidInput, "starting with a letter or digit"),
    ({"prefix": "ac me-"}, InvalidInput, "letters, digits"),
    ({"prefix": "a..-"}, InvalidInput, "letters, digits"),
    ({"user": "al/ice"}, InvalidScope, "user_id"),
    ({"user": "alice", "name": "x\ny"}, InvalidInput, "control characters"),
    ({"user": "alice", "rate_limit": 0}, InvalidInput, "rate_limit"),
    ({"user": "alice", "rate_limit": True}, InvalidInput, "rate_limit"),
])
def test_bad_key_settings_are_refused_and_nothing_is_stored(store, kwargs, error, words):
    before = len(list_keys(store))
    with pytest.raises(error, match=words):
        create_key(store, **kwargs)
    assert len(list_keys(store)) == before


def test_scoped_work_cannot_read_or_write_keys(store, user):
    create_key(store, user=user)
    for sql in ("SELECT count(*) FROM api_keys", "DELETE FROM api_keys",
                "UPDATE api_keys SET revoked_at = NULL"):
        with pytest.raises(ScopeViolation), store.scoped(user) as db:
            db.execute(sql)


def test_revoking_an_unknown_or_malformed_id_is_an_error(store):
    with pytest.raises(NotFound):
        revoke_key(store, "0" * 12)
    with pytest.raises(InvalidInput, match="12 hexadecimal digits"):
        revoke_key(store, "mpk_secret")


def test_the_keys_commands(dsn, monkeypatch, user):
    monkeypatch.setenv("MEMPLUG_DSN", dsn)
    runner = CliRunner()
    made = json.loads(runner.invoke(main, ["keys", "create", "--prefix", f"{user}-", "--name", "app", "--rate", "5",
                                           "--json"], catch_exceptions=False).output)
    assert made["covers"] == f"{user}-*" and made["rate_limit"] == 5.0 and made["key"].startswith("mpk_")
    plain = runner.invoke(main, ["keys", "create", "--user", user], catch_exceptions=False)
    assert plain.exit_code == 0 and plain.stdout.strip().startswith("mpk_")
    listed = runner.invoke(main, ["keys", "list", "--json"], catch_exceptions=False).output
    assert made["id"] in listed and made["key"] not in listed and plain.stdout.strip() not in listed
    assert runner.invoke(main, ["keys", "revoke", made["id"]]).exit_code == 0
    rows = {r["id"]: r for r in json.loads(runner.invoke(main, ["keys", "list", "--json"]).output)}
    assert rows[made["id"]]["revoked_at"] is not None
    refused = runner.invoke(main, ["keys", "create", "--prefix", "acme"])
    assert refused.exit_code == 2 and "must end with one of" in refused.output


def test_the_rate_limit_allows_a_burst_then_the_rate():
    limiter = RateLimiter(rate=5)
    for _ in range(10):  # twice the rate at once
        limiter.take("k")
    with pytest.raises(RateLimited) as e:
        limiter.take("k")
    assert 0 < e.value.retry_after <= 0.2 + 1e-9
    limiter.take("other")  # per key
    own = RateLimiter(rate=0)  # off, but a key's own rate applies
    for _ in range(1000):
        own.take("free")
    own.take("slow", 1.0)
    own.take("slow", 1.0)
    with pytest.raises(RateLimited, match="limit of 1 requests per second"):
        own.take("slow", 1.0)
