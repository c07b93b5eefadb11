"""One JSON error shape for every failure, and the handlers that guarantee it.

Every error a client sees is `{"error": {"message": str, "type": str, "code": str | null}}`
(the OpenAI shape, so OpenAI clients raise their usual exceptions). Internal errors get a generic
message; the exception and its traceback go to the server log only.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("tuneloop.serve")

# HTTP status -> OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 504: "timeout_error",
}
INTERNAL_MESSAGE = "internal server error (the details are in the server log)"


class ApiError(Exception):
    """An error answered to the client as is: status, message and (optionally) a code."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """The contract's error JSON for a status code.

    The message may quote the request (a field name); text that is not valid Unicode (a lone
    surrogate) is written as its escape, so the JSON can always be encoded.
    """
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "code": code}}


def error_response(status: int, message: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    """`("body", "messages", 0, "content", "str")` -> `messages[0].content` (pydantic's union branch tags dropped)."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "path", "query", "header") else loc)
    parts = [p for p in parts if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or str(loc[0] if loc else "body")


def validation_message(errors: list[dict[str, Any]]) -> str:
    """A readable one-line summary of pydantic errors that names each field."""
    shown = []
    for e in errors[:3]:
        msg = str(e.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        shown.append(f"{field_name(tuple(e.get('loc', ())))}: {msg}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(shown) + more


async def _validation_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "the request body is not valid JSON", "invalid_json")
    if any(tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), bytes) for e in errors):
        # FastAPI parses JSON only when the Content-Type says so; the raw bytes arrive otherwise
        return error_response(400, "the request body must be JSON, sent with 'Content-Type: application/json'",
                              "invalid_json")
    return error_response(422, validation_message(errors))


async def _api_error_handler(_request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.code, exc.headers)


async def _http_error_handler(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code >= 500:
        return error_response(exc.status_code, INTERNAL_MESSAGE)
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no such endpoint"
    return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Route FastAPI's and Starlette's errors (and ours) through `error_body`."""
    app.add_exception_handler(RequestValidationError, _validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _api_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)  # type: ignore[arg-type]


class CatchAllMiddleware:
    """Outermost guard: an unhandled exception becomes a generic 500 and a server log entry.

    If the response had already started (a stream), nothing more can be sent; the exception is
    logged and the connection simply ends.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                body = json.dumps(error_body(500, INTERNAL_MESSAGE)).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
