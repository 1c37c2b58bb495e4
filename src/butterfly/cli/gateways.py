"""A client of several gateways: `--url A,B,C` tries the next address.

Any gateway-capable node may be the acting one (`cluster.gateways`); a standby answers
with a 307 to the acting gateway, which the client follows. When an address cannot be
reached, or answers 503 (a standby that does not know the acting gateway's URL, or a
gateway without a plan yet), the next one is tried. A request that reached a gateway and
failed in any other way is not sent again: it may have been accepted, and sending it
elsewhere would run it twice.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx


def parse_urls(option: str) -> list[str]:
    """The addresses of a `--url` option, in order, without trailing slashes.

    >>> parse_urls("http://a:8080/, http://b:8081")
    ['http://a:8080', 'http://b:8081']
    """
    urls = [u.strip().rstrip("/") for u in option.split(",")]
    return [u for u in urls if u]


def first_answer(
    urls: list[str], send: Callable[[str], httpx.Response]
) -> tuple[str, httpx.Response]:
    """`send(url)` to each address in turn until one answers other than 503; returns the
    address and its answer (the last 503, if all gave one). Raises the last connection
    error when none could be reached."""
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
    if answer is not None:
        return answer
    raise failure if failure is not None else httpx.ConnectError("no gateway address given")


__all__ = ["first_answer", "parse_urls"]
