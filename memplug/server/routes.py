"""The ``/v1`` endpoints of ``memplug serve``: :class:`memplug.Memory`'s methods, one each.

Every endpoint gets the request's API key (checked by the front, before the body was read), names a
scope the key must cover, and runs the library's call in a worker thread, timed for ``Server-Timing``.
"""

import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .. import __version__
from ..errors import InvalidInput, MemplugError, NotFound, Unauthenticated
from ..memory import Memory
from ..types import Budget, Move, Scope
from . import keys as api_keys
from . import wire
from .bodies import (
    ConsolidateBody,
    FeedbackBody,
    ForgetBody,
    IdsBody,
    KeysBody,
    MessagesBody,
    PutBody,
    ReadBody,
    ScopeBody,
    ScopeField,
    WriteBatchBody,
    WriteBody,
)
from .replies import error, reply, request_id, state_of

if TYPE_CHECKING:
    from .http import PoolRefresh, ServeConfig

T = TypeVar("T")


def add_routes(api: FastAPI, memory: Memory, refresh: "PoolRefresh", config: "ServeConfig") -> None:
    """Health and readiness, and (with ``config.api``) the /v1 endpoints, on ``api``."""
    bearer = HTTPBearer(auto_error=False, description="A memplug API key: memplug keys create --user U")

    @api.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok", "version": __version__}

    @api.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        """Postgres answers: 200, else 503."""
        try:
            with memory.store.transaction() as db:
                db.execute("SELECT 1")
        except MemplugError:
            refresh.now()
            return error(503, "StoreUnavailable", "Postgres does not answer", request_id(request),
                          {"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    if not config.api:
        return

    async def key_of(request: Request,
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> api_keys.ApiKey:
        # The front checked the key before the body was read (see create_app); this declares it for the docs.
        key = state_of(request).get("api_key")
        if key is None:  # pragma: no cover - the front refuses such requests
            raise Unauthenticated("this API needs an API key: Authorization: Bearer mpk_... (memplug keys create)")
        return key

    Key = Annotated[api_keys.ApiKey, Depends(key_of)]

    def scope_of(request: Request, key: api_keys.ApiKey, scope: str) -> Scope:
        parsed = key.check(Scope.parse(scope))
        state_of(request)["user"] = parsed.user_id
        return parsed

    def call(request: Request, fn: Callable[[], T], retry: bool = False) -> T:
        """Run ``fn``, timed; after a lost connection, refresh the pool and (for a call that is safe to
        repeat) retry once."""
        t0 = time.perf_counter()
        try:
            return refresh.run(fn, retry)
        finally:
            state = state_of(request)
            state["memplug_ms"] = state.get("memplug_ms", 0.0) + (time.perf_counter() - t0) * 1000

    items = lambda found: {"items": [wire.item_json(it) for it in found]}  # noqa: E731

    @api.post("/v1/write", tags=["write"])
    def write(request: Request, key: Key, body: WriteBody) -> Response:
        """Store one text as an item of the scope (identical text already there: that item)."""
        scope = scope_of(request, key, body.scope)
        item = call(request, lambda: memory.write(scope, body.text, body.metadata, occurred_at=body.occurred_at),
                    retry=True)
        return reply({"item": wire.item_json(item)})

    @api.post("/v1/write_batch", tags=["write"])
    def write_batch(request: Request, key: Key, body: WriteBatchBody) -> Response:
        """Store several texts in one transaction."""
        scope = scope_of(request, key, body.scope)
        return reply(items(call(request, lambda: memory.write(scope, body.texts, body.metadata,
                                                        occurred_at=body.occurred_at), retry=True)))

    @api.post("/v1/put", tags=["write"])
    def put(request: Request, key: Key, body: PutBody) -> Response:
        """Store texts under your own keys (document ids), replacing what a key held."""
        scope = scope_of(request, key, body.scope)
        return reply(items(call(request, lambda: memory.put(scope, body.keys, body.texts, body.metadatas,
                                                      occurred_at=body.occurred_at), retry=True)))

    @api.post("/v1/messages", tags=["write"])
    def messages(request: Request, key: Key, body: MessagesBody) -> Response:
        """Store conversation turns of one session (the scope names a session)."""
        scope = scope_of(request, key, body.scope)
        turns = [m.model_dump(exclude_none=True) for m in body.messages]
        return reply(items(call(request, lambda: memory.write_messages(scope, turns))))

    @api.post("/v1/read", tags=["read"])
    def read(request: Request, key: Key, body: ReadBody) -> Response:
        """What the scope's memory holds for the query: ranked hits, pinned hits, and the items served
        as KV memory or by the adapter (as text), with the memory block in `text`."""
        scope = scope_of(request, key, body.scope)
        budget = Budget(**body.budget.model_dump()) if body.budget is not None else None
        recall = call(request, lambda: memory.read(scope, body.query, budget, body.filters, since=body.since,
                                                   until=body.until, min_relevance=body.min_relevance), retry=True)
        return reply(wire.recall_json(recall))

    @api.post("/v1/feedback", tags=["read"])
    def feedback(request: Request, key: Key, body: FeedbackBody) -> Response:
        """Report which returned items the answer used."""
        scope = scope_of(request, key, body.scope)
        call(request, lambda: memory.feedback(scope, body.item_ids, body.used))
        return reply({"ok": True})

    @api.post("/v1/forget", tags=["forget"])
    def forget(request: Request, key: Key, body: ForgetBody) -> Response:
        """Forget items (item_ids), or the whole scope and every scope under it (all: true), from every tier."""
        scope = scope_of(request, key, body.scope)
        if (body.item_ids is None) == (not body.all):
            raise InvalidInput("forget needs item_ids or all: true, not both")
        n = call(request, lambda: memory.forget(scope, None if body.all else body.item_ids), retry=body.all)
        return reply({"forgotten": n})

    @api.post("/v1/forget_keys", tags=["forget"])
    def forget_keys(request: Request, key: Key, body: KeysBody) -> Response:
        """Forget the items stored under these keys in exactly this scope."""
        scope = scope_of(request, key, body.scope)
        return reply({"forgotten": call(request, lambda: memory.forget_keys(scope, body.keys), retry=True)})

    @api.post("/v1/get", tags=["read"])
    def get(request: Request, key: Key, body: IdsBody) -> Response:
        """The items with these ids, if the scope can see them (404 otherwise)."""
        scope = scope_of(request, key, body.scope)
        return reply(items(call(request, lambda: memory.get(scope, body.item_ids), retry=True)))

    @api.post("/v1/get_keys", tags=["read"])
    def get_keys(request: Request, key: Key, body: KeysBody) -> Response:
        """The items stored under these keys in exactly this scope."""
        scope = scope_of(request, key, body.scope)
        return reply(items(call(request, lambda: memory.get_keys(scope, body.keys), retry=True)))

    @api.get("/v1/items", tags=["read"])
    def list_items(request: Request, key: Key, scope: ScopeField, limit: int = 100, offset: int = 0) -> Response:
        """Items the scope can see, oldest first."""
        parsed = scope_of(request, key, scope)
        return reply(items(call(request, lambda: memory.items(parsed, limit, offset), retry=True)))

    @api.get("/v1/turns", tags=["read"])
    def turns(request: Request, key: Key, scope: ScopeField) -> Response:
        """The conversation turns the scope's session still holds."""
        parsed = scope_of(request, key, scope)
        return reply(items(call(request, lambda: memory.turns(parsed), retry=True)))

    @api.get("/v1/inspect", tags=["read"])
    def inspect(request: Request, key: Key, scope: ScopeField, limit: int = 200) -> Response:
        """Where each item of the scope sits, its usage and the history of its moves."""
        parsed = scope_of(request, key, scope)
        return reply({"items": wire.plain(call(request, lambda: memory.inspect(parsed, limit), retry=True))})

    @api.get("/v1/stats", tags=["read"])
    def stats(request: Request, key: Key, scope: ScopeField) -> Response:
        """Counts of the scope and the scopes under it."""
        parsed = scope_of(request, key, scope)
        data = call(request, lambda: memory.stats(parsed), retry=True)
        data.pop("store", None)  # where the database is, which is the server's business
        data.pop("database_bytes", None)  # the whole database's size, every tenant's
        return reply(wire.plain(data))

    @api.post("/v1/end_session", tags=["consolidate"])
    def end_session(request: Request, key: Key, body: ScopeBody) -> Response:
        """Move a session's turns into long-term memory now."""
        scope = scope_of(request, key, body.scope)
        placed = call(request, lambda: memory.end_session(scope))
        return reply({"placements": [wire.placement_json(p) for p in placed]})

    @api.post("/v1/consolidate", tags=["consolidate"])
    def consolidate(request: Request, key: Key, body: ConsolidateBody) -> Response:
        """Run the policies' moves (or the given ones) now, or queue them for `memplug worker` (queue: true)."""
        scope = scope_of(request, key, body.scope)
        moves = None if body.moves is None else [Move(tuple(m.item_ids), m.src_level, m.dst_level, m.reason)
                                                 for m in body.moves]
        if body.queue:
            return reply({"job_id": call(request, lambda: memory.enqueue_consolidation(scope, moves))})
        placed = call(request, lambda: memory.consolidate(scope, moves))
        return reply({"placements": [wire.placement_json(p) for p in placed]})

    @api.get("/v1/jobs/{job_id}", tags=["consolidate"])
    def job(request: Request, key: Key, job_id: int) -> Response:
        """A consolidation job's status, if its scope belongs to a user the key covers (404 otherwise)."""
        found = call(request, lambda: _job(memory, job_id), retry=True)
        if found is None or not key.allows(Scope.parse(found["scope"]).user_id):
            raise NotFound(f"no consolidation job {job_id} for this key")
        return reply(found)

    @api.get("/v1/export", tags=["export"], response_class=StreamingResponse)
    async def export(request: Request, key: Key, scope: ScopeField) -> StreamingResponse:
        """The items of the scope and every scope under it, as JSON lines (`memplug export`'s format)."""
        from ..aio import iterate_in_thread
        from ..portability import export as export_lines

        parsed = scope_of(request, key, scope)
        lines = iterate_in_thread(lambda: export_lines(memory, parsed))
        try:  # the first line before the status: a failure to start is still an error status
            first = await anext(lines)
        except StopAsyncIteration:
            first = None

        async def body() -> AsyncIterator[bytes]:
            if first is None:
                return
            yield (first + "\n").encode()
            async for line in lines:
                yield (line + "\n").encode()

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @api.post("/v1/import", tags=["export"])
    async def import_(request: Request, key: Key, scope: ScopeField) -> dict[str, Any]:
        """Restore JSON lines made by export into the scope (its user replaces theirs); all or nothing."""
        from ..portability import import_ as import_lines

        parsed = scope_of(request, key, scope)
        data = await request.body()
        done = await anyio.to_thread.run_sync(lambda: call(request, lambda: import_lines(memory, parsed, data),
                                                           retry=True))
        return {"written": done.written, "existing": done.existing}

    @api.get("/v1/key", tags=["keys"])
    async def whoami(key: Key) -> dict[str, Any]:
        """The key this request was made with: its id and the users it covers."""
        return {"id": key.id, "covers": key.covers, "user_id": key.user_id, "user_prefix": key.user_prefix,
                "name": key.name, "rate_limit": key.rate_limit}


def _job(memory: Memory, job_id: int) -> dict[str, Any] | None:
    from ..jobs import SCHEMA, TASK, ensure_schema

    if not 0 < job_id < 2**63:
        raise InvalidInput(f"job id {job_id} is out of range")
    ensure_schema(memory.store.dsn)
    with memory.store.transaction() as db:
        row = db.execute(
            f"""SELECT j.id, j.args, j.status::text, j.attempts,
                       (SELECT max(e.at) FROM {SCHEMA}.procrastinate_events e WHERE e.job_id = j.id
                        AND e.type IN ('succeeded', 'failed', 'cancelled', 'aborted'))
                FROM {SCHEMA}.procrastinate_jobs j WHERE j.id = %s AND j.task_name = %s""",
            (job_id, TASK)).fetchone()
    if row is None:
        return None
    return {"id": row[0], "scope": row[1].get("scope", ""), "status": row[2], "attempts": row[3],
            "moves": None if row[1].get("moves") is None else len(row[1]["moves"]), "finished_at": wire.when(row[4])}
