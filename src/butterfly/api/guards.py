"""Who may call what, and how often: bearer tokens and per-client rate limits.

With `api.tokens` set, every HTTP request needs `Authorization: Bearer <token>` with one
of them (`RequireToken`, an ASGI middleware, so a route added later, FastAPI's own
`/docs` and `/openapi.json`, and unknown paths are covered without anyone remembering to
add a dependency); only `/health` stays open, and `/metrics` when `api.metrics_public`.

The rate limit is keyed on who the gateway knows the client is: the principal of a valid
bearer token (a hash of the token), otherwise the peer address. Never on a header value
it has not verified: keyed on the raw `Authorization` header, a client sending a made-up
value per request had a fresh bucket each time and was never limited.

Both are built by `create_app` from the settings, so their state (the buckets) belongs
to one app and dies with it; both follow `api.tokens` and `api.rate_limit` live.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from butterfly.api.errors import Unauthorized, error_response
from butterfly.types.errors import RateLimited

MAX_CLIENTS = 10_000
"""Buckets kept; the least recently seen client is forgotten first (a full bucket)."""


def principal_of(token: str) -> str:
    """The name a token's holder goes by in the rate limiter: a hash, so the token
    itself is never a key in memory nor in a log line."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]


class BearerAuth:
    """Checks `Authorization: Bearer <token>` against the configured tokens, when any are."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self.retune(tokens)

    def retune(self, tokens: frozenset[str]) -> None:
        """A changed api.tokens, from the next request on: a revoked token is refused."""
        self._tokens = tuple((t.encode(), principal_of(t)) for t in sorted(tokens))

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def principal(self, authorization: str | None) -> str | None:
        """The principal of a valid bearer token in this header value, else None."""
        scheme, _, given = (authorization or "").partition(" ")
        candidate = given.strip().encode()
        if scheme.lower() != "bearer" or not candidate:
            return None
        # compare with every token, so the time taken does not say which one nearly matched
        matched = [p for t, p in self._tokens if hmac.compare_digest(candidate, t)]
        return matched[0] if matched else None

    def check(self, authorization: str | None) -> None:
        """`Unauthorized` unless no tokens are configured or the header carries one."""
        if not self._tokens:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("this endpoint needs an `Authorization: Bearer <token>` header")
        if self.principal(authorization) is None:
            raise Unauthorized("the bearer token is not valid for this gateway")

    async def __call__(self, request: Request) -> None:
        """As a route dependency (the config routes declare theirs)."""
        self.check(request.headers.get("authorization"))


class RequireToken:
    """ASGI middleware: every HTTP request passes `bearer` unless its path is open.

    `open_paths` is read per request, so `api.metrics_public` applies live."""

    def __init__(
        self, app: ASGIApp, *, bearer: BearerAuth, open_paths: Callable[[], Collection[str]]
    ) -> None:
        self.app, self.bearer, self.open_paths = app, bearer, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and self.bearer.required
        if guarded and scope["path"] not in self.open_paths():
            try:
                self.bearer.check(Headers(scope=scope).get("authorization"))
            except Unauthorized as e:
                response = error_response(401, e.kind, e.message)
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class _Bucket:
    tokens: float
    at: float


def address_of(host: str) -> str:
    """The address a client is counted as: IPv6 by its /64 (one host usually holds a whole
    /64, so keyed on the full address it would have 2**64 buckets), anything else as is."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def client_key(bearer: BearerAuth, request: Request) -> str:
    """Whom a request is counted against: its verified principal, else its address (the
    TCP peer: a proxy's forwarding headers are as unverified as any other header)."""
    principal = bearer.principal(request.headers.get("authorization"))
    if principal is not None:
        return principal
    return "address:" + address_of(request.client.host if request.client else "unknown")


class RateLimiter:
    """A token bucket per client, as `key` names it (`client_key` in the app)."""

    def __init__(
        self,
        per_s: float,
        burst: int,
        key: Callable[[Request], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_s, self.burst, self._key, self._clock = per_s, burst, key, clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    async def __call__(self, request: Request) -> None:
        if self.per_s <= 0:
            return
        self.take(self._key(request))

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
                f"more than {self.per_s:g} requests/s from this client; retry in {wait:.2f}s",
                retry_after_s=wait,
            )
        bucket.tokens -= 1.0


__all__ = ["BearerAuth", "RateLimiter", "RequireToken", "address_of", "client_key", "principal_of"]
