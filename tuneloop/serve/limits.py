"""Per-key limits: requests per minute and generated tokens per minute, as token buckets.

Each key (by the name it was configured with) gets two buckets that hold at most one minute's
allowance and refill continuously. A request takes one unit from the request bucket; a chat
request needs a positive token balance to start, and its generated tokens are taken from the
token bucket when the answer is complete. The balance may go below zero (a generation's length is
known only afterwards), so one long answer delays the key's next ones until the debt is refilled.
Refusals say how long to wait (`Retry-After`, whole seconds). The admin token is exempt.

Written by hand rather than with the `limits` package (slowapi's backend): its limiters take a
cost before the work and cannot charge a cost learned afterwards (no debt), which is what the token
cap needs; a bucket is a few lines. The state lives on the app (`app.state.limits`), one per app.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from tuneloop.serve.auth import ADMIN, ANONYMOUS, Caller, send_error


@dataclass
class Bucket:
    """`per_minute` units at most, refilled at `per_minute / 60` per second."""

    per_minute: int
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(float(self.per_minute), self.level + (now - self.stamp) * self.per_minute / 60.0)
        self.stamp = now

    def wait_for(self, amount: float) -> int:
        """Whole seconds until the level reaches `amount` (at least 1)."""
        missing = amount - self.level
        return max(1, math.ceil(missing * 60.0 / self.per_minute))


class KeyLimits:
    """The buckets of every key seen; thread-safe (the event loop and generation threads use it)."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int,
                 clock: Callable[[], float] = time.monotonic):
        self.requests_per_minute, self.tokens_per_minute = requests_per_minute, tokens_per_minute
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], Bucket] = {}  # (kind, key name); names come from the key list

    def _bucket(self, kind: str, name: str, per_minute: int) -> Bucket:
        now = self.clock()
        bucket = self._buckets.get((kind, name))
        if bucket is None:
            bucket = self._buckets[(kind, name)] = Bucket(per_minute, float(per_minute), now)
        bucket.refill(now)
        return bucket

    def take_request(self, caller: Caller) -> int | None:
        """Count one request; None when allowed, else the seconds to wait."""
        if caller.role == ADMIN or self.requests_per_minute == 0:
            return None
        with self._lock:
            bucket = self._bucket("requests", caller.name, self.requests_per_minute)
            if bucket.level < 1.0:
                return bucket.wait_for(1.0)
            bucket.level -= 1.0
            return None

    def tokens_wait(self, caller: Caller) -> int | None:
        """None when the key may start a generation (its token balance is positive), else the seconds to wait."""
        if caller.role == ADMIN or self.tokens_per_minute == 0:
            return None
        with self._lock:
            bucket = self._bucket("tokens", caller.name, self.tokens_per_minute)
            return None if bucket.level > 0 else bucket.wait_for(1.0)

    def charge_tokens(self, caller: Caller, tokens: int) -> None:
        """Take a finished generation's tokens from the key's balance (it may go negative)."""
        if caller.role == ADMIN or self.tokens_per_minute == 0 or tokens <= 0:
            return
        with self._lock:
            self._bucket("tokens", caller.name, self.tokens_per_minute).level -= tokens


class RateLimitMiddleware:
    """429 (with `Retry-After`) for a `/v1/` request over its key's requests per minute.

    Runs after the auth middleware, which has put the caller in the request state.
    """

    def __init__(self, app: ASGIApp, limits: KeyLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            caller = scope.get("state", {}).get("caller", ANONYMOUS)
            wait = self.limits.take_request(caller)
            if wait is not None:
                await send_error(send, 429, f"too many requests: this key may send {self.limits.requests_per_minute} "
                                            f"per minute (serve.requests_per_minute); retry in {wait} s",
                                 "rate_limit_exceeded", [(b"retry-after", str(wait).encode())])
                return
        await self.app(scope, receive, send)
