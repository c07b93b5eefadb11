"""API keys and roles (client, reviewer, admin), and the request-size guard.

Client keys come from the environment variable named by `serve.api_keys_env`, reviewer keys from
the one named by `serve.reviewer_keys_env`: comma-separated entries `name:key` or a bare `key`
(named `client-<position>` / `reviewer-<position>`). The admin token comes from the variable named
by `serve.admin_token_env` and is accepted wherever a key is. Requests send
`Authorization: Bearer <key>`. Paths under `/v1/admin` need the admin token, other `/v1/` paths
a client or reviewer key; the web pages, `/openapi.json` and `/static/...` load without one.

Roles: a client reads and rates only the interactions it asked for; a reviewer reads and rates
every interaction; the admin may do everything (and is exempt from the rate limits).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneloop.config import ServeSettings
from tuneloop.serve.errors import error_body

ADMIN_CLIENT = "admin"
ANONYMOUS_CLIENT = "anonymous"
CLIENT, REVIEWER, ADMIN = "client", "reviewer", "admin"  # roles


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's name and its role."""

    name: str
    role: str = CLIENT

    @property
    def sees_everything(self) -> bool:
        """Reviewers and the admin may read and rate any interaction; clients only their own."""
        return self.role in (REVIEWER, ADMIN)


ANONYMOUS = Caller(ANONYMOUS_CLIENT)


def caller_of(request: Request) -> Caller:
    """Who the auth middleware found for this request's key (`AuthMiddleware` sets it)."""
    return request.scope.get("state", {}).get("caller", ANONYMOUS)


@dataclass(frozen=True)
class KeyRing:
    """The configured credentials: client name per key, and the admin token (if any)."""

    clients: dict[str, str]  # key -> client name
    admin_token: str | None
    auth: bool = True  # False (--no-auth): clients need no key; admin endpoints still need the token
    reviewers: dict[str, str] = field(default_factory=dict)  # key -> reviewer name

    @classmethod
    def from_env(cls, settings: ServeSettings, auth: bool = True) -> KeyRing:
        return cls(parse_keys(os.environ.get(settings.api_keys_env, "")),
                   os.environ.get(settings.admin_token_env, "").strip() or None, auth,
                   parse_keys(os.environ.get(settings.reviewer_keys_env, ""), "reviewer"))

    def caller_for(self, key: str) -> Caller | None:
        """Who a key belongs to (the admin token is caller "admin" with role admin), or None."""
        if self.is_admin(key):
            return Caller(ADMIN_CLIENT, ADMIN)
        found = None
        for keys, role in ((self.clients, CLIENT), (self.reviewers, REVIEWER)):
            for known, name in keys.items():  # compare against every key: constant time
                if hmac.compare_digest(known.encode(), key.encode()):
                    found = Caller(name, role)
        return found

    def client_for(self, key: str) -> str | None:
        """The name of a key's owner, or None."""
        caller = self.caller_for(key)
        return caller.name if caller else None

    def is_admin(self, key: str) -> bool:
        return self.admin_token is not None and hmac.compare_digest(self.admin_token.encode(), key.encode())


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (the only addresses `--no-auth` may listen on)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def parse_keys(raw: str, prefix: str = "client") -> dict[str, str]:
    """`"alice:k1, k2"` -> `{"k1": "alice", "k2": "client-2"}` (a bare key is named by its position)."""
    keys: dict[str, str] = {}
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    for position, entry in enumerate(entries, start=1):
        name, sep, key = entry.partition(":")
        if sep and name.strip() and key.strip():
            keys[key.strip()] = name.strip()
        else:
            keys[entry] = f"{prefix}-{position}"
    return keys


def bearer(scope: Scope) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer":
                return None
            return token.strip() or None
    return None


async def send_error(send: Send, status: int, message: str, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer with the contract's JSON error from inside an ASGI middleware."""
    body = json.dumps(error_body(status, message, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Checks the bearer key before anything else reads the request; sets `state["client"]`."""

    def __init__(self, app: ASGIApp, keys: KeyRing):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        key = bearer(scope)
        challenge = [(b"www-authenticate", b"Bearer")]
        if path.startswith("/v1/admin"):
            if key is None:
                await send_error(send, 401, "missing admin token (send 'Authorization: Bearer <token>')",
                                 "missing_api_key", challenge)
                return
            if not self.keys.is_admin(key):
                if self.keys.client_for(key) is None:
                    await send_error(send, 401, "invalid admin token", "invalid_api_key", challenge)
                elif self.keys.admin_token is None:
                    await send_error(send, 403, "no admin token is configured on this server", "admin_only")
                else:
                    await send_error(send, 403, "this endpoint needs the admin token, not a client key",
                                     "admin_only")
                return
            caller = Caller(ADMIN_CLIENT, ADMIN)
        elif not self.keys.auth:  # --no-auth: a known key still counts (a reviewer, the admin)
            caller = (self.keys.caller_for(key) if key else None) or ANONYMOUS
        elif key is None:
            await send_error(send, 401, "missing API key (send 'Authorization: Bearer <key>')",
                             "missing_api_key", challenge)
            return
        else:
            found = self.keys.caller_for(key)
            if found is None:
                await send_error(send, 401, "invalid API key", "invalid_api_key", challenge)
                return
            caller = found
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole request body first (at most `max_bytes`); larger bodies get 413.

    Both a declared Content-Length and the bytes actually received are checked, so a chunked
    upload without a length cannot get past the limit either.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        too_large = f"request body larger than {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(send, 400, "invalid Content-Length header", "invalid_content_length")
                    return
                if declared > self.max_bytes:
                    await send_error(send, 413, too_large, "request_too_large")
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await send_error(send, 413, too_large, "request_too_large")
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for the disconnect, as the server would

        await self.app(scope, replay, send)
