"""What ``memplug serve`` answers: JSON bodies, and every failure as a status with a named error."""

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..errors import (
    AccessDenied,
    InvalidInput,
    MemplugError,
    ModelUnavailable,
    NotFound,
    RateLimited,
    ScopeViolation,
    StoreUnavailable,
    Unauthenticated,
)

STATUS: list[tuple[type[MemplugError], int]] = [
    (Unauthenticated, 401), (AccessDenied, 403), (ScopeViolation, 403), (RateLimited, 429), (NotFound, 404),
    (InvalidInput, 400), (StoreUnavailable, 503), (ModelUnavailable, 503),
]


def error_response(e: MemplugError, request_id: str | None = None) -> JSONResponse:
    status = next((s for cls, s in STATUS if isinstance(e, cls)), 500)
    headers = {}
    if isinstance(e, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(e, RateLimited):
        headers["Retry-After"] = str(max(1, round(e.retry_after)))
    elif status == 503:
        headers["Retry-After"] = "1"
    return error(status, type(e).__name__, str(e), request_id, headers)


def reply(data: Any) -> Response:
    """``data`` as a JSON response, encoded in the calling (worker) thread, not on the event loop."""
    return Response(json.dumps(data, ensure_ascii=False, allow_nan=False).encode(), media_type="application/json")


def error(status: int, kind: str, message: str, request_id: str | None = None,
           headers: dict[str, str] | None = None, **more: Any) -> JSONResponse:
    body = {"error": kind, "message": message, **more}
    if request_id:
        body["request_id"] = request_id
    return JSONResponse(body, status_code=status, headers=headers)


def validation_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    rid = request_id(request)
    problems: list[dict[str, str]] = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        where, path = (loc[0], loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else ("body", loc)
        field = ".".join(path)
        kind = err.get("type", "")
        if kind == "json_invalid":
            why = (err.get("ctx") or {}).get("error", "malformed")
            return error(400, "InvalidInput", f"the body is not valid JSON ({why})", rid)
        if where == "body" and not path and kind in ("model_attributes_type", "dict_type", "model_type") \
                and not is_json(request):
            return error(415, "InvalidInput", "send the body as JSON (Content-Type: application/json)", rid)
        if kind == "extra_forbidden":
            message = f"unknown field {field!r}"
        elif kind == "missing":
            message = "a JSON body is required" if where == "body" and not path else f"{field!r} is required"
        elif where == "body" and not path:
            message = f"the body must be a JSON object ({err.get('msg', '')})"
        else:
            message = f"{field or where}: {err.get('msg', 'invalid')}"
        if where == "query":
            message = f"query parameter {message}"
        problems.append({"field": field, "problem": message})
    text = "; ".join(p["problem"] for p in problems) or "the request is malformed"
    return error(422, "InvalidInput", text, rid, problems=problems)


def is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json") or not kind


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def state_of(request: Request) -> dict[str, Any]:
    return request.scope.setdefault("state", {})
