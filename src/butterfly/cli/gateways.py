"""A client of several gateways: `--url A,B,C` tries the next address.

Any gateway-capable node may be the acting one (`cluster.gateways`); a standby answers
with a 307 to the acting gateway, which `request` follows with the token (every CLI
command's HTTP call goes through it). When an address cannot be
reached, or answers 503 (a standby that does not know the acting gateway's URL, or a
gateway without a plan yet), the next one is tried. A request that reached a gateway and
failed in any other way is not sent again: it may have been accepted, and sending it
elsewhere would run it twice.

A takeover takes the failure detection (about 0.5 s) and a little more; meanwhile every
address may fail (the dead gateway refuses, a standby redirects to it or answers 503
while it takes over), so `first_answer` can go round the list again for a while.
Reading a task's result is idempotent: `wait_result` polls it by id across every address
whatever went wrong, so a client whose gateway died mid-request still gets the answer
its successor finishes (the task was copied to it before the 202).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx

RETRY_S = 1.0
"""Between rounds of the address list: the `Retry-After` a gateway between roles sends."""
MAX_REDIRECTS = 3
"""A standby's redirect is one hop; a takeover under way may add one or two (a gateway
that just stepped down redirects again). More is a loop, not a cluster."""
REDIRECTS = frozenset({307, 308})
"""The redirects a standby gateway sends (307 keeps the method and the body); any other
3xx is no gateway's, and is an answer like any other status."""
DEFAULT_PORTS = {"http": 80, "https": 443}


class RedirectRefused(httpx.HTTPError):
    """A redirect `request` will not follow: a Location that is not one of the gateways
    the redirecting node lists, or too many hops. Its message says what to give `--url`
    instead. An `httpx.HTTPError`, since it ends the HTTP exchange as theirs do, but not a
    transport error: the next `--url` address is not tried (the operator should look)."""


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """Scheme, host and port, the port spelled out: what a browser calls the origin.

    >>> origin(httpx.URL("http://a/x")) == origin(httpx.URL("http://a:80/y"))
    True
    """
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme)


def trusted_redirect(target: httpx.URL, gateways: Iterable[str]) -> bool:
    """Whether a redirect to `target` may be followed with the request's token: its origin
    is one of `gateways`' (the API URLs the redirecting node's `/health` lists).

    >>> trusted_redirect(httpx.URL("http://b:8081/inference"), ["http://a:8080", "http://b:8081"])
    True
    >>> trusted_redirect(httpx.URL("https://elsewhere/login"), ["http://a:8080"])
    False
    """
    allowed = set()
    for url in gateways:
        try:
            allowed.add(origin(httpx.URL(url)))
        except httpx.InvalidURL:
            continue  # another server's list: no entry of it is trusted
    return origin(target) in allowed


def listed_gateways(client: httpx.Client, at: httpx.URL) -> list[str]:
    """The gateway API URLs the node at `at` lists in its `/health` (empty for anything
    that is not a gateway's answer)."""
    try:
        body = client.get(at.join("/health")).json()
    except ValueError:
        return []
    entries = body.get("gateways") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        return []
    return [g["url"] for g in entries if isinstance(g, dict) and isinstance(g.get("url"), str)]


def _follow(client: httpx.Client, response: httpx.Response) -> httpx.URL:
    """Where `response` (a 307/308) leads, if `trusted_redirect`; else RedirectRefused."""
    location = response.headers.get("Location")
    if not location:
        raise RedirectRefused(f"{response.url} answered {response.status_code} without a Location")
    target = response.url.join(location)
    listed = listed_gateways(client, response.url)
    if not trusted_redirect(target, listed):
        raise RedirectRefused(
            f"{response.url} redirected to {target}, which is not one of the gateways its "
            f"/health lists ({', '.join(listed) or 'none'}); not following it with the "
            "request and its token: give --url the acting gateway's address"
        )
    return target


def request(
    method: str,
    url: str,
    *,
    token: str | None = None,
    json: Any = None,
    params: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Response:
    """One CLI request to a gateway, following a standby's redirect to the acting one.

    httpx drops `Authorization` on a redirect to another origin, and every gateway serves
    its API on its own port (another origin), so a command with `--token` sent to a
    standby got 401 from the acting gateway. Here a 307/308 is re-sent by hand (same
    method, body and token), at most `MAX_REDIRECTS` times, and only to a Location whose
    origin is one of the gateway URLs the redirecting node's `/health` lists. The token
    already went to that node (the address the operator named); re-sending it only where
    that node says the cluster's gateways are keeps it inside the cluster, and refuses a
    redirect anywhere else (a proxy's login page, another site), the case httpx guards
    against. Same-host-only would be simpler but refuses every redirect of a cluster
    whose gateways are on several machines, the deployed case. The check costs one
    `/health` read per redirect. Raises RedirectRefused, or httpx's errors."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(timeout=timeout, transport=transport) as client:
        response = client.request(method, url, json=json, params=params, headers=headers)
        for _ in range(MAX_REDIRECTS):
            if response.status_code not in REDIRECTS:
                return response
            target = _follow(client, response)  # carries the query, params included
            response = client.request(method, target, json=json, headers=headers)
    if response.status_code in REDIRECTS:
        raise RedirectRefused(
            f"{url} still redirects after {MAX_REDIRECTS} hops (last to "
            f"{response.headers.get('Location')}); give --url the acting gateway's address"
        )
    return response


def parse_urls(option: str) -> list[str]:
    """The addresses of a `--url` option, in order, without trailing slashes.

    >>> parse_urls("http://a:8080/, http://b:8081")
    ['http://a:8080', 'http://b:8081']
    """
    urls = [u.strip().rstrip("/") for u in option.split(",")]
    return [u for u in urls if u]


def first_answer(
    urls: list[str],
    send: Callable[[str], httpx.Response],
    *,
    patience_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, httpx.Response]:
    """`send(url)` to each address in turn until one answers other than 503; returns the
    address and its answer (the last 503, if all gave one). Raises the last connection
    error when none could be reached. With `patience_s`, a round in which every address
    refused or answered 503 is tried again after `RETRY_S`, until that long has passed
    (a takeover under way): neither reached a gateway that kept the request."""
    deadline = clock() + patience_s
    while True:
        failure: httpx.TransportError | None = None
        answer: tuple[str, httpx.Response] | None = None
        for url in urls:
            try:
                response = send(url)
            except httpx.TransportError as e:
                if not isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
                    raise  # it may have reached the gateway: never sent twice
                failure = e
                continue
            if response.status_code != 503:
                return url, response
            answer = (url, response)
        if not urls or clock() + RETRY_S > deadline:
            break
        sleep(RETRY_S)
    if answer is not None:
        return answer
    raise failure if failure is not None else httpx.ConnectError("no gateway address given")


def wait_result(
    urls: list[str],
    task_id: str,
    get: Callable[[str, str], httpx.Response],
    *,
    limit_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> httpx.Response:
    """The answer of `GET /result/{task_id}` once the task has ended (any status but 202
    and 503), asking each address in turn: `get(url, path)`. A read can be sent again
    anywhere, so a connection that failed, even mid-answer (the gateway died), or a 503
    moves on to the next address, and after a round with no answer it waits `RETRY_S`.
    Raises `TimeoutError` after `limit_s` (the last connection error's cause kept)."""
    deadline = clock() + limit_s
    failure: Exception | None = None
    while clock() < deadline:
        progressed = False
        for url in urls:
            left = deadline - clock()
            if left <= 0:
                break
            try:
                response = get(url, f"/result/{task_id}?wait={min(30.0, max(0.0, left)):.1f}")
            except httpx.TransportError as e:
                failure = e
                continue
            if response.status_code == 202:  # still running: ask the same gateway again
                progressed = True
                break
            if response.status_code != 503:
                return response
        if not progressed:
            sleep(RETRY_S)
    raise TimeoutError(f"task {task_id} did not end within {limit_s:.0f} s") from failure


__all__ = [
    "MAX_REDIRECTS",
    "RETRY_S",
    "RedirectRefused",
    "first_answer",
    "listed_gateways",
    "origin",
    "parse_urls",
    "request",
    "trusted_redirect",
    "wait_result",
]
