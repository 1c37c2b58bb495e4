"""Who may call what, and how often: bearer tokens, web pages, per-client rate limits.

With `api.tokens` set, every HTTP request needs `Authorization: Bearer <token>` with one
of them (`RequireToken`, an ASGI middleware, so a route added later, FastAPI's own
`/docs` and `/openapi.json`, and unknown paths are covered without anyone remembering to
add a dependency); only `/health` stays open, and `/metrics` when `api.metrics_public`.

The rate limit is keyed on who the gateway knows the client is: the principal of a valid
bearer token (a hash of the token), otherwise the peer address. Never on a header value
it has not verified: keyed on the raw `Authorization` header, a client sending a made-up
value per request had a fresh bucket each time and was never limited.

Web pages (`SameOrigin`): the browser of an operator whose API is open on 127.0.0.1 is
a client too, and any site it visits may send it requests. A `text/plain` POST is a CORS
"simple request", sent cross-origin with no preflight, and every route reads its body as
JSON whatever the type, so a page could change the cluster's config or queue work (a
review). So POST, PUT, PATCH and DELETE that a browser marks as from another site
(`Sec-Fetch-Site`) or another origin (`Origin` other than the `Host` it was sent to)
are refused (403), and an API bound to a loopback address answers only to loopback
`Host` names, `api.host` and `api.allowed_hosts` (421): a page whose own name was
rebound to 127.0.0.1 is same-origin with the API and could read its answers too. curl,
the SDKs and the CLI send neither header.

All are built by `create_app` from the settings, so their state (the buckets) belongs
to one app and dies with it; tokens and the rate limit follow `api.tokens` and
`api.rate_limit` live.
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
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}


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


def is_loopback(host: str) -> bool:
    """`localhost` (and its subdomains, which resolve to loopback by RFC 6761) or a
    loopback address (127.0.0.0/8, ::1)."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def authority(value: str) -> tuple[str, int | None]:
    """The host name (lowercase, IPv6 without brackets) and port of a `Host` header or
    an origin's authority; the port is None when not given or not a number."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:  # a bare name, or a bare IPv6 address
        name, port = value, ""
    return canonical_host(name), int(port) if port.isascii() and port.isdigit() else None


def canonical_host(name: str) -> str:
    """One spelling per host: an IP address as `ipaddress` writes it (`::1` for
    `0:0::0001`, `::ffff:a00:5` for `::ffff:10.0.0.5`), a name without its trailing dot.
    Compared as written, an IPv6 address named in `api.allowed_hosts` in one spelling
    was refused in another (a review)."""
    name = name.strip("[]").lower().rstrip(".")
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        return name


class SameOrigin:
    """ASGI middleware: refuses what a web page, not a client, sent (module docstring).

    `bind_host`: the address the API listens on (`api.host`): the `Host` check applies
    when it is a loopback one. `allowed_hosts`: more names the API is reached by (a
    reverse proxy's), served as `Host` and accepted as an `Origin`'s host on any port."""

    def __init__(self, app: ASGIApp, *, bind_host: str, allowed_hosts: Collection[str]) -> None:
        self.app, self.bind_host = app, bind_host
        self.check_host = is_loopback(bind_host)
        self.allowed = frozenset(authority(h)[0] for h in allowed_hosts)
        self.served = self.allowed | {authority(bind_host)[0]}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = (
            self.refusal(scope["method"], Headers(scope=scope)) if scope["type"] == "http" else None
        )
        if refused is not None:
            status, kind, message = refused
            await error_response(status, kind, message)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, method: str, headers: Headers) -> tuple[int, str, str] | None:
        """(status, error type, message) for a request to refuse, else None."""
        host = headers.get("host")
        if self.check_host and host is not None:
            name = authority(host)[0]
            if not is_loopback(name) and name not in self.served:
                return (
                    421,
                    "misdirected_request",
                    f"this API is bound to the loopback address {self.bind_host} and answers "
                    f"only to localhost, loopback addresses and the names in api.host and "
                    f"api.allowed_hosts, not to Host {host!r} (a web page whose name was "
                    "rebound to this machine sends that); reach it as localhost or "
                    "127.0.0.1, or add the name to api.allowed_hosts",
                )
        if method not in STATE_CHANGING:
            return None
        site = headers.get("sec-fetch-site", "").lower()
        origin = headers.get("origin")
        if origin is not None and self.allowed_origin(origin):
            return None  # a page of a name the operator allowed, whatever site it is
        if site in ("cross-site", "same-site"):
            why = f"Sec-Fetch-Site: {site}"
        elif origin is not None and not self.same_origin(origin, host):
            why = f"Origin {origin!r}, not the Host {host!r} it was sent to"
        else:
            return None
        return (
            403,
            "cross_site_request",
            f"a browser sent this {method} from another web site ({why}): a page may not "
            "change the cluster or queue work through a visitor's browser. Clients "
            "(curl, the SDKs, the CLI) send no such header; a browser page on another "
            "name reached through a proxy needs that name in api.allowed_hosts",
        )

    def allowed_origin(self, origin: str) -> bool:
        """Whether `origin` is an http(s) origin on a name in `api.allowed_hosts`: its
        pages may post to the API from a browser that marks them same-site or cross-site
        (every current one does; refused for it before, they were served only by
        browsers that send no `Sec-Fetch-Site`: a review)."""
        scheme, sep, rest = origin.strip().lower().partition("://")
        return bool(sep) and scheme in DEFAULT_PORTS and authority(rest)[0] in self.allowed

    def same_origin(self, origin: str, host: str | None) -> bool:
        """Whether `origin` is the origin the request was sent to (or an allowed name)."""
        scheme, sep, rest = origin.strip().lower().partition("://")
        if not sep or scheme not in DEFAULT_PORTS or host is None:  # "null": a sandbox, a file
            return False
        name, port = authority(rest)
        if name in self.allowed:
            return True
        target, target_port = authority(host)
        default = DEFAULT_PORTS[scheme]  # a TLS proxy's Host has none: the origin's scheme
        return (name, port or default) == (target, target_port or default)


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


__all__ = [
    "BearerAuth",
    "RateLimiter",
    "RequireToken",
    "SameOrigin",
    "address_of",
    "authority",
    "client_key",
    "is_loopback",
    "principal_of",
]
