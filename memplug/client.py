"""A client of ``memplug serve`` with :class:`~memplug.Memory`'s methods for the text path.

    from memplug.client import Client
    mem = Client("http://127.0.0.1:8080", key="mpk_...")   # was: mem = Memory()
    mem.write("alice", "I moved to Lisbon in May.")
    print(mem.read("alice", "where does alice live?").as_text())

Arguments and return values are those of :class:`~memplug.Memory` (Items, Recalls,
Placements), and failures raise the same :class:`~memplug.MemplugError` subclasses the
server reports: :class:`~memplug.InvalidInput` for what it refused,
:class:`~memplug.AccessDenied` for a user the key does not cover,
:class:`~memplug.RateLimited`, and :class:`~memplug.StoreUnavailable` when the server (or
its Postgres) cannot be reached. A :class:`~memplug.Recall` read over HTTP carries the
items its KV memory and adapter hold as text (``as_text()``); the tensors stay on the server.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime
from typing import Any

import httpx

from . import errors
from .errors import InvalidInput, MemplugError, NotFound, StoreUnavailable
from .server import wire
from .types import Budget, Item, Move, Placement, Recall, Scope

# Requests that change nothing, or whose repetition changes nothing more: retried once when the
# server was unreachable or answered 503 (its Postgres restarting).
RETRIED = {"/v1/read", "/v1/get", "/v1/get_keys", "/v1/items", "/v1/turns", "/v1/inspect", "/v1/stats",
           "/v1/write", "/v1/write_batch", "/v1/put", "/v1/forget_keys", "/v1/key"}


class Client:
    """Memory on a memplug server. ``url`` defaults to ``$MEMPLUG_URL`` and ``key`` to ``$MEMPLUG_API_KEY``.

    One client may be shared by threads. ``last_server_ms`` is the time the server spent in memplug on
    the last request, and ``last_handler_ms`` the time from the request's arrival at the server to its
    response (both from ``Server-Timing``): they tell the HTTP path's own cost apart.
    """

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: float = 60.0,
                 retry_wait_s: float = 0.5, transport: httpx.BaseTransport | None = None):
        url = url or os.environ.get("MEMPLUG_URL") or "http://127.0.0.1:8080"
        key = key if key is not None else os.environ.get("MEMPLUG_API_KEY")
        if not key:
            raise errors.ConfigError("a memplug server needs an API key: Client(url, key='mpk_...') or $MEMPLUG_API_KEY "
                                     "(memplug keys create)")
        self.url = url.rstrip("/")
        self.retry_wait_s = retry_wait_s
        self.last_server_ms: float | None = None
        self.last_handler_ms: float | None = None
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {key}", "User-Agent": "memplug-client"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never the key
        return f"Client({self.url!r})"

    # -- transport -------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None,
              content: bytes | None = None, stream: bool = False) -> httpx.Response:
        attempts = 2 if path in RETRIED else 1
        for attempt in range(attempts):
            try:
                request = self._http.build_request(
                    method, path, params=params, content=content if content is not None else
                    (None if body is None else json.dumps(body, default=_json_default).encode()),
                    headers={"Content-Type": "application/x-ndjson" if content is not None else "application/json"})
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if attempt + 1 < attempts:
                    time.sleep(self.retry_wait_s)
                    continue
                raise StoreUnavailable(f"cannot reach the memplug server at {self.url}: {type(e).__name__}") from None
            if response.status_code == 503 and attempt + 1 < attempts:
                response.close()
                time.sleep(self.retry_wait_s)
                continue
            timing = response.headers.get("server-timing", "")
            self.last_server_ms = _server_ms(timing, "memplug")
            self.last_handler_ms = _server_ms(timing, "server")
            if response.status_code >= 400:
                if stream:
                    response.read()
                raise _error(response)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None) -> Any:
        return self._send(method, path, body, params).json()

    def _items(self, path: str, body: Any = None, params: Mapping[str, Any] | None = None,
               method: str = "POST") -> list[Item]:
        return [wire.item_from_json(d) for d in self._json(method, path, body, params)["items"]]

    # -- write -----------------------------------------------------------------------------------

    def write(self, scope: Scope | str, text: str | Sequence[str], metadata: Any = None, *,
              occurred_at: Any = None) -> Item | list[Item]:
        """Store one text (returns its Item) or a list of texts (returns a list), as :meth:`Memory.write`."""
        if isinstance(text, str):
            body = {"scope": _scope(scope), "text": text, "metadata": metadata, "occurred_at": occurred_at}
            return wire.item_from_json(self._json("POST", "/v1/write", body)["item"])
        body = {"scope": _scope(scope), "texts": _list(text, "text"), "metadata": _seq(metadata),
                "occurred_at": _seq(occurred_at)}
        return self._items("/v1/write_batch", body)

    def put(self, scope: Scope | str, keys: Sequence[str], texts: Sequence[str],
            metadatas: Sequence[Mapping[str, Any] | None] | None = None, *, occurred_at: Any = None) -> list[Item]:
        """Store texts under your keys (document ids), as :meth:`Memory.put`."""
        return self._items("/v1/put", {"scope": _scope(scope), "keys": _list(keys, "keys"), "texts": _list(texts, "texts"),
                                       "metadatas": _seq(metadatas), "occurred_at": _seq(occurred_at)})

    def get_keys(self, scope: Scope | str, keys: Iterable[str]) -> list[Item]:
        return self._items("/v1/get_keys", {"scope": _scope(scope), "keys": _list(keys, "keys")})

    def forget_keys(self, scope: Scope | str, keys: Iterable[str]) -> int:
        return int(self._json("POST", "/v1/forget_keys", {"scope": _scope(scope), "keys": _list(keys, "keys")})
                   ["forgotten"])

    def write_messages(self, scope: Scope | str, messages: Iterable[Any]) -> list[Item]:
        """Store conversation turns of one session, as :meth:`Memory.write_messages`."""
        return self._items("/v1/messages", {"scope": _scope(scope), "messages": [_message(m) for m in
                                                                                 _list(messages, "messages")]})

    # -- read ------------------------------------------------------------------------------------

    def read(self, scope: Scope | str, query: str, budget: Budget | None = None,
             filters: Mapping[str, Any] | None = None, *, since: Any = None, until: Any = None,
             min_relevance: float | None = None) -> Recall:
        """What the scope's memory holds for ``query``, as :meth:`Memory.read`."""
        if budget is not None and not isinstance(budget, Budget):
            raise InvalidInput(f"budget must be a memplug.Budget, got {type(budget).__name__}")
        body = {"scope": _scope(scope), "query": query, "filters": filters, "since": since, "until": until,
                "min_relevance": min_relevance,
                "budget": None if budget is None else {"tokens": budget.tokens, "k": budget.k,
                                                       "kv_tokens": budget.kv_tokens}}
        return wire.recall_from_json(self._json("POST", "/v1/read", body))

    def feedback(self, scope: Scope | str, item_ids: Iterable[int], used: bool = True) -> None:
        self._json("POST", "/v1/feedback", {"scope": _scope(scope), "item_ids": _list(item_ids, "item_ids"),
                                            "used": used})

    def get(self, scope: Scope | str, item_ids: Iterable[int]) -> list[Item]:
        return self._items("/v1/get", {"scope": _scope(scope), "item_ids": _list(item_ids, "item_ids")})

    def turns(self, scope: Scope | str) -> list[Item]:
        return self._items("/v1/turns", params={"scope": _scope(scope)}, method="GET")

    def items(self, scope: Scope | str, limit: int = 100, offset: int = 0) -> list[Item]:
        return self._items("/v1/items", params={"scope": _scope(scope), "limit": limit, "offset": offset},
                           method="GET")

    def inspect(self, scope: Scope | str, limit: int = 200) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/inspect", params={"scope": _scope(scope), "limit": limit})["items"]

    def stats(self, scope: Scope | str) -> dict[str, Any]:
        return self._json("GET", "/v1/stats", params={"scope": _scope(scope)})

    # -- forget and consolidate -------------------------------------------------------------------

    def forget(self, scope: Scope | str, item_ids: Iterable[int] | None = None) -> int:
        """Forget items, or (without ``item_ids``) the whole scope and every scope under it."""
        body = {"scope": _scope(scope), "all": item_ids is None,
                "item_ids": None if item_ids is None else _list(item_ids, "item_ids")}
        return int(self._json("POST", "/v1/forget", body)["forgotten"])

    def end_session(self, scope: Scope | str) -> list[Placement]:
        return [wire.placement_from_json(p) for p in
                self._json("POST", "/v1/end_session", {"scope": _scope(scope)})["placements"]]

    def consolidate(self, scope: Scope | str, moves: Iterable[Move] | None = None) -> list[Placement]:
        """Run the consolidation on the server now; return the placements."""
        body = {"scope": _scope(scope), "moves": _moves(moves), "queue": False}
        return [wire.placement_from_json(p) for p in self._json("POST", "/v1/consolidate", body)["placements"]]

    def enqueue_consolidation(self, scope: Scope | str, moves: Iterable[Move] | None = None) -> int:
        """Queue a consolidation for ``memplug worker``; return the job id (see :meth:`job`)."""
        body = {"scope": _scope(scope), "moves": _moves(moves), "queue": True}
        return int(self._json("POST", "/v1/consolidate", body)["job_id"])

    def job(self, job_id: int) -> dict[str, Any]:
        """A queued consolidation's status: ``todo``, ``doing``, ``succeeded``, ``failed``..."""
        return self._json("GET", f"/v1/jobs/{int(job_id)}")

    # -- export and import ------------------------------------------------------------------------

    def export(self, scope: Scope | str) -> Iterator[str]:
        """The scope's items as JSON lines (``memplug export``'s format), streamed."""
        response = self._send("GET", "/v1/export", params={"scope": _scope(scope)}, stream=True)
        try:
            yield from (line for line in response.iter_lines() if line)
        finally:
            response.close()

    def import_(self, scope: Scope | str, lines: Iterable[str | bytes] | str | bytes) -> dict[str, int]:
        """Restore JSON lines into ``scope`` (its user replaces theirs); ``{"written", "existing"}``."""
        if isinstance(lines, str | bytes):
            data = lines.encode() if isinstance(lines, str) else lines
        else:
            data = b"\n".join(line.encode() if isinstance(line, str) else line for line in lines)
        return self._send("POST", "/v1/import", params={"scope": _scope(scope)}, content=data).json()

    # -- async facade (each call in a worker thread, as Memory's) ------------------------------------

    async def awrite(self, *args: Any, **kwargs: Any):
        return await asyncio.to_thread(functools.partial(self.write, *args, **kwargs))

    async def awrite_messages(self, *args: Any, **kwargs: Any) -> list[Item]:
        return await asyncio.to_thread(functools.partial(self.write_messages, *args, **kwargs))

    async def aread(self, *args: Any, **kwargs: Any) -> Recall:
        return await asyncio.to_thread(functools.partial(self.read, *args, **kwargs))

    async def aforget(self, *args: Any, **kwargs: Any) -> int:
        return await asyncio.to_thread(functools.partial(self.forget, *args, **kwargs))

    async def afeedback(self, *args: Any, **kwargs: Any) -> None:
        return await asyncio.to_thread(functools.partial(self.feedback, *args, **kwargs))

    async def aconsolidate(self, *args: Any, **kwargs: Any) -> list[Placement]:
        return await asyncio.to_thread(functools.partial(self.consolidate, *args, **kwargs))

    async def aenqueue_consolidation(self, *args: Any, **kwargs: Any) -> int:
        return await asyncio.to_thread(functools.partial(self.enqueue_consolidation, *args, **kwargs))


def _scope(scope: Scope | str) -> str:
    return str(Scope.of(scope))


def _list(values: Any, what: str) -> list[Any]:
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
        raise InvalidInput(f"{what} must be a list, got {type(values).__name__}")
    return list(values)


def _seq(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _message(m: Any) -> Any:
    if isinstance(m, tuple | list) and len(m) == 2:
        return {"role": m[0], "content": m[1]}
    if not isinstance(m, Mapping) and hasattr(m, "role") and hasattr(m, "content"):
        return {"role": m.role, "content": m.content}
    return m


def _moves(moves: Iterable[Move] | None) -> list[dict[str, Any]] | None:
    if moves is None:
        return None
    if isinstance(moves, Move | str | bytes) or not isinstance(moves, Iterable):
        raise InvalidInput(f"moves must be a list of memplug.Move values, got {type(moves).__name__}")
    moves = list(moves)
    if not all(isinstance(m, Move) for m in moves):
        raise InvalidInput("moves must be memplug.Move values")
    return [{"item_ids": list(m.item_ids), "src_level": m.src_level, "dst_level": m.dst_level, "reason": m.reason}
            for m in moves]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise InvalidInput(f"{type(value).__name__} is not JSON (use str, number, bool, None, list, dict)")


def _server_ms(timing: str, metric: str) -> float | None:
    for part in timing.split(","):
        name, _, params = part.strip().partition(";")
        if name == metric and params.startswith("dur="):
            try:
                return float(params[4:])
            except ValueError:
                return None
    return None


def _error(response: httpx.Response) -> MemplugError:
    """The server's error as the MemplugError it was (by name), else by status."""
    try:
        data = response.json()
        kind, message = data.get("error"), data.get("message") or response.reason_phrase
    except (ValueError, AttributeError):
        kind, message = None, f"HTTP {response.status_code} {response.reason_phrase}"
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, MemplugError)):
        cls = {401: errors.Unauthenticated, 403: errors.AccessDenied, 404: NotFound, 429: errors.RateLimited,
               503: StoreUnavailable}.get(response.status_code,
                                          InvalidInput if 400 <= response.status_code < 500 else MemplugError)
    if cls is errors.RateLimited:
        return errors.RateLimited(message, float(response.headers.get("retry-after") or 1))
    return cls(message)
