"""Which memplug scope a LangChain call works in: per call, per config, or per instance."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplug import InvalidScope, Scope

# Keys of ``config["configurable"]`` (and of an agent's runtime context) that name the scope.
SCOPE_KEYS = ("user_id", "agent_id", "session_id")


def scope_from(source: Any) -> Scope | None:
    """A scope named by ``source``: a Scope, a ``user/agent/session`` string, or a mapping or
    object with ``memplug_scope`` or ``user_id`` (plus optional ``agent_id``, ``session_id``)."""
    if source is None:
        return None
    if isinstance(source, (Scope, str)):
        return Scope.of(source)
    get = source.get if isinstance(source, Mapping) else (lambda k, d=None: getattr(source, k, d))
    named = get("memplug_scope", None)
    if named is not None:
        return Scope.of(named)
    user = get("user_id", None)
    if user is None:
        return None
    return Scope(str(user), _opt(get("agent_id", None)), _opt(get("session_id", None)))


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


def resolve(explicit: Any, config: Mapping[str, Any] | None, default: Any, what: str) -> Scope:
    """The call's scope: ``explicit`` (a ``scope=`` argument), else the config's
    ``configurable`` keys, else the instance's ``default``."""
    for source in (explicit, (config or {}).get("configurable"), default):
        scope = scope_from(source)
        if scope is not None:
            return scope
    raise InvalidScope(
        f"{what} has no scope: set scope=... on it, pass scope=... to the call, or put "
        "'user_id' (and optionally 'agent_id', 'session_id') or 'memplug_scope' in config['configurable']")
