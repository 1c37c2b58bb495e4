"""Who may call what, and how often: bearer tokens and per-client rate limits.

Both are FastAPI dependencies built by `create_app` from the settings, so their state
(the buckets) belongs to one app and dies with it.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from butterfly.api.errors import Unauthorized
from butterfly.types.errors import RateLimited

MAX_CLIENTS = 10_000
"""Buckets kept; the least recently seen client is forgotten first (a full bucket)."""


class BearerAuth:
    """Requires `Authorization: Bearer <token>` with a configured token, when any are."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens)

    def retune(self, tokens: frozenset[str]) -> None:
        """A changed api.tokens, from the next request on: a revoked token is refused."""
        self._tokens = tuple(t.encode() for t in tokens)

    async def __call__(self, request: Request) -> None:
        if not self._tokens:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("this endpoint needs an `Authorization: Bearer <token>` header")
        candidate = given.strip().encode()
        # compare with every token, so the time taken does not say which one nearly matched
        if not any([hmac.compare_digest(candidate, t) for t in self._tokens]):
            raise Unauthorized("the bearer token is not valid for this gateway")


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per client (bearer token if sent, else the peer address)."""

    def __init__(
        self, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_s, self.burst, self._clock = per_s, burst, clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    async def __call__(self, request: Request) -> None:
        if self.per_s <= 0:
            return
        auth = request.headers.get("authorization")
        key = auth or (request.client.host if request.client else "unknown")
        self.take(key)

    def retune(self, per_s: float, burst: int) -> None:
        """Apply a changed limit at once (api.rate_limit is dynamic-local)."""
        self.per_s, self.burst = per_s, burst

    def take(self, key: str) -> None:
        now = self._clock()
        bucket = self._buckets.pop(key, None) or _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.per_s)
        bucket.at = now
        self._buckets[key] = bucket
        if len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / self.per_s
            raise RateLimited(
                f"more than {self.per_s:g} requests/s from this client; retry in {wait:.2f}s"
            )
        bucket.tokens -= 1.0


__all__ = ["BearerAuth", "RateLimiter"]
