"""A client of several gateways: `--url A,B,C` tries the next address.

Any gateway-capable node may be the acting one (`cluster.gateways`); a standby answers
with a 307 to the acting gateway, which the client follows. When an address cannot be
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
from collections.abc import Callable

import httpx

RETRY_S = 1.0
"""Between rounds of the address list: the `Retry-After` a gateway between roles sends."""


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


__all__ = ["RETRY_S", "first_answer", "parse_urls", "wait_result"]
