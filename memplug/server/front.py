"""The outermost layer of ``memplug serve``: request ids, the body size limit, ``Server-Timing``,
JSON access logs, and a last guard that no failure (nor its message) reaches the ASGI server.

Each response carries ``X-Request-Id`` and ``Server-Timing``: ``memplug;dur=<ms>``, the time spent
in memplug itself, and ``server;dur=<ms>``, from the request's arrival to its response. Access logs
are JSON lines on the ``memplug.access`` logger: method, path, status, time, sizes, key id and user;
never a body, a query string or a key.
"""

import contextlib
import json
import logging
import time
import traceback
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from .replies import error

log = logging.getLogger("memplug.server")
access_log = logging.getLogger("memplug.access")


def header(scope: AsgiScope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def log_crash(request_id: str | None, exc: BaseException) -> None:
    """A failure's type and where it happened, without its message (which may quote stored data)."""
    frames = "".join(traceback.format_tb(exc.__traceback__)[-6:])
    log.error("request %s failed: %s\n%s", request_id, type(exc).__name__, frames)


class Front:
    """The outermost layer: request ids, the body size limit, Server-Timing, JSON access logs, and a
    last guard that no failure reaches the ASGI server (whose log would print its message)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, log_access: bool = True):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.log_access = log_access

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status, sent, size_in = 0, 0, 0
        started = False

        async def respond(message: Message) -> None:
            nonlocal status, sent, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", rid.encode()))
                timing = f"server;dur={(time.perf_counter() - t0) * 1000:.2f}"
                if "memplug_ms" in state:
                    timing = f"memplug;dur={state['memplug_ms']:.2f}, {timing}"
                headers.append((b"server-timing", timing.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        async def refuse(code: int, message: str) -> None:
            response = error(code, "InvalidInput", message, rid)
            await response(scope, receive, respond)

        try:
            length = header(scope, b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await refuse(413 if length.isdigit() else 400,
                             f"the body is {length} bytes; the limit is {self.max_body_bytes} (--max-body-bytes)"
                             if length.isdigit() else "Content-Length is not a number")
                return
            chunks: list[bytes] = []
            more = True
            while more:  # the whole body, within the limit, before the app sees any of it
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size_in += len(chunk)
                if size_in > self.max_body_bytes:
                    await refuse(413, f"the body is over the limit of {self.max_body_bytes} bytes (--max-body-bytes)")
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return await receive()

            await self.app(scope, replay, respond)
        except Exception as exc:  # noqa: BLE001 - logged without its message; the client gets a 500 if it can
            if not state.get("crash_logged"):
                log_crash(rid, exc)
            if not started:
                with contextlib.suppress(Exception):
                    await error(500, "InternalError", f"the server failed (request {rid}); see its log",
                                 rid)(scope, receive, respond)
        finally:
            if self.log_access:
                self._log(scope, state, rid, status, t0, size_in, sent)

    @staticmethod
    def _log(scope: AsgiScope, state: dict[str, Any], rid: str, status: int, t0: float, size_in: int,
             sent: int) -> None:
        user = scope.get("user")  # MCP: the SDK's authenticated user, whose token is the key's id
        key_id = state.get("key_id") or getattr(getattr(user, "access_token", None), "client_id", None)
        record = {"ts": round(time.time(), 3), "request_id": rid, "method": scope.get("method"),
                  "path": scope.get("path"), "status": status, "ms": round((time.perf_counter() - t0) * 1000, 2),
                  "bytes_in": size_in, "bytes_out": sent, "key": key_id, "user": state.get("user")}
        if "memplug_ms" in state:
            record["memplug_ms"] = round(state["memplug_ms"], 2)
        client = scope.get("client")
        if client:
            record["client"] = client[0]
        access_log.info(json.dumps(record))
