"""API keys of ``memplug serve`` and ``memplug mcp --http``: one per tenant, stored hashed in Postgres.

A key is bound to one user (``alice``) or to a prefix of users (``acme-``), for an
application that keeps many users' memory. A request names its scope; the key must
cover the scope's user, else :class:`~memplug.errors.AccessDenied`. The work itself
then runs in a scoped transaction, where row-level security holds the same boundary
in Postgres.

A key reads ``mpk_<id>_<secret>``. The id is public (it is what ``memplug keys list``
shows and what access logs name); the secret is 32 random bytes, shown once, when
the key is made. Postgres keeps the SHA-256 digest of the whole key. A salted slow
hash (bcrypt, argon2) protects passwords that people choose and reuse; a key of 256
random bits cannot be guessed from its digest, and a fast digest keeps the check
off every request's critical path.

The table ``api_keys`` belongs to the tables' owner: scoped transactions (role
``memplug_app``) have no privilege on it, and row-level security with no policy
for that role would show them no row even if one were granted.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import AccessDenied, InvalidInput, NotFound, Unauthenticated
from ..store import APP_ROLE, SCHEMA, Store
from ..types import MAX_ID_LEN, Scope

COMPONENT = "server"
MIGRATIONS: tuple[str, ...] = (
    # 1: keys, hashed; each bound to one user or to a prefix of users
    f"""
    CREATE TABLE api_keys (
        id          text PRIMARY KEY,
        digest      bytea NOT NULL,
        user_id     text,
        user_prefix text,
        name        text NOT NULL DEFAULT '',
        rate_limit  double precision CHECK (rate_limit > 0),
        created_at  timestamptz NOT NULL DEFAULT now(),
        revoked_at  timestamptz,
        CONSTRAINT api_keys_one_binding CHECK ((user_id IS NULL) <> (user_prefix IS NULL))
    );
    ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
    REVOKE ALL ON api_keys FROM {APP_ROLE};
    """,
)

PREFIX = "mpk_"
_TOKEN = re.compile(r"mpk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
# A prefix ends where a user id's own part begins: "acme-" covers "acme-bob", and never "acmecorp".
PREFIX_ENDS = "-_.@+"
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+\-]*")
MAX_NAME = 200


@dataclass(frozen=True)
class ApiKey:
    """One API key, as stored (never its secret)."""

    id: str
    user_id: str | None
    user_prefix: str | None
    name: str = ""
    rate_limit: float | None = None  # requests per second per server process; None: the server's default
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    @property
    def covers(self) -> str:
        """The users the key may act for, in words: ``alice`` or ``acme-*``."""
        return self.user_id if self.user_id is not None else f"{self.user_prefix}*"

    def allows(self, user_id: str) -> bool:
        if self.user_id is not None:
            return user_id == self.user_id
        return user_id.startswith(self.user_prefix or "\x00") and len(user_id) > len(self.user_prefix or "")

    def check(self, scope: Scope | str) -> Scope:
        """``scope`` as a :class:`Scope`, if this key covers its user; else :class:`AccessDenied`."""
        scope = Scope.of(scope)
        if not self.allows(scope.user_id):
            raise AccessDenied(f"API key {self.id} covers user(s) {self.covers}, not {scope.user_id!r}")
        return scope


def ensure_schema(store: Store) -> None:
    """Create (or bring up to date) the keys table; safe from many processes at once."""
    store.migrate(COMPONENT, MIGRATIONS)


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix) or ".." in prefix:
        raise InvalidInput(f"user prefix {prefix!r} must be letters, digits and _ . @ + -, starting with a "
                           "letter or digit")
    if len(prefix) >= MAX_ID_LEN:
        raise InvalidInput(f"user prefix is {len(prefix)} characters; it must be shorter than {MAX_ID_LEN}")
    if prefix[-1] not in PREFIX_ENDS:
        raise InvalidInput(f"user prefix {prefix!r} must end with one of {' '.join(PREFIX_ENDS)} "
                           f"(e.g. {prefix + '-'!r}), so that it cannot cover {prefix + 'corp'!r} too")
    return prefix


def create_key(store: Store, *, user: str | None = None, prefix: str | None = None, name: str = "",
               rate_limit: float | None = None) -> tuple[ApiKey, str]:
    """Make a key for ``user`` or for every user starting with ``prefix``; return it and its secret
    form (``mpk_...``), which is shown this once and never stored."""
    if (user is None) == (prefix is None):
        raise InvalidInput("a key is bound to a user or to a prefix of users: give one of them")
    if user is not None:
        user = Scope(user).user_id
    else:
        prefix = check_prefix(prefix)
    if not isinstance(name, str) or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise InvalidInput(f"the key's name must be text of at most {MAX_NAME} characters, without control "
                           "characters")
    if rate_limit is not None and (isinstance(rate_limit, bool) or not isinstance(rate_limit, int | float)
                                   or not 0 < rate_limit < 1e9):
        raise InvalidInput(f"rate_limit must be a number of requests per second above 0, got {rate_limit!r}")
    ensure_schema(store)
    key_id = secrets.token_hex(6)
    token = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    with store.transaction() as db:
        row = db.execute(
            "INSERT INTO api_keys (id, digest, user_id, user_prefix, name, rate_limit) VALUES (%s, %s, %s, %s, %s, %s) "
            "RETURNING created_at", (key_id, _digest(token), user, prefix, name, rate_limit)).fetchone()
    return ApiKey(key_id, user, prefix, name, None if rate_limit is None else float(rate_limit), row[0]), token


def list_keys(store: Store) -> list[ApiKey]:
    """Every key, revoked ones included, oldest first."""
    ensure_schema(store)
    with store.transaction() as db:
        rows = db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id").fetchall()
    return [ApiKey(*r) for r in rows]


def revoke_key(store: Store, key_id: str) -> ApiKey:
    """Revoke a key by its id (``memplug keys list`` shows them): every server refuses it from its next
    request on. Revoking it again changes nothing."""
    if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{12}", key_id):
        raise InvalidInput(f"a key id is 12 hexadecimal digits (memplug keys list shows them), got {key_id!r}")
    ensure_schema(store)
    with store.transaction() as db:
        row = db.execute(f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s "
                         f"RETURNING {_COLUMNS}", (key_id,)).fetchone()
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    return ApiKey(*row)


def verify_key(store: Store, token: object) -> ApiKey:
    """The live key whose secret form is ``token``; :class:`Unauthenticated` if it is malformed,
    unknown or revoked (the message never repeats the token)."""
    key_id = key_id_of(token)
    with store.transaction() as db:
        row = db.execute(LOOKUP, (key_id,)).fetchone()
    return live_key(row, token)


def key_id_of(token: object) -> str:
    """The public id inside a key's secret form, if the form is right (else :class:`Unauthenticated`)."""
    match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
    if match is None:
        raise Unauthenticated("the API key is malformed; memplug keys look like mpk_<id>_<secret>")
    return match.group(1)


def live_key(row: Sequence[Any] | None, token: str) -> ApiKey:
    """The key of a :data:`LOOKUP` row, if ``token`` is its secret form and it is not revoked."""
    if row is None or not hmac.compare_digest(bytes(row[-1]), _digest(token)):
        raise Unauthenticated("unknown API key")
    key = ApiKey(*row[:-1])
    if key.revoked_at is not None:
        raise Unauthenticated(f"API key {key.id} was revoked")
    return key


_COLUMNS = "id, user_id, user_prefix, name, rate_limit, created_at, revoked_at"
# One key by id, with its digest last (schema-qualified: servers may look keys up on connections of their own).
LOOKUP = f"SELECT {_COLUMNS}, digest FROM {SCHEMA}.api_keys WHERE id = %s"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
