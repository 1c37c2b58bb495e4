"""`--url A,B,C`: which address a client's request ends at (cli.gateways)."""

from __future__ import annotations

import httpx
import pytest

from butterfly.cli.gateways import first_answer, parse_urls


def test_the_next_address_is_tried_when_one_is_down_or_answers_503() -> None:
    tried: list[str] = []

    def send(url: str) -> httpx.Response:
        tried.append(url)
        if url == "http://a":
            raise httpx.ConnectError("refused")
        if url == "http://b":
            return httpx.Response(503)
        return httpx.Response(202)

    url, response = first_answer(parse_urls("http://a/, http://b,http://c"), send)
    assert (url, response.status_code) == ("http://c", 202)
    assert tried == ["http://a", "http://b", "http://c"]


def test_a_request_that_may_have_arrived_is_never_sent_twice() -> None:
    tried: list[str] = []

    def send(url: str) -> httpx.Response:
        tried.append(url)
        raise httpx.ReadTimeout("no answer")  # the gateway may have accepted it

    with pytest.raises(httpx.ReadTimeout):
        first_answer(["http://a", "http://b"], send)
    assert tried == ["http://a"]


def test_the_last_503_is_the_answer_when_every_gateway_gives_one() -> None:
    url, response = first_answer(["http://a", "http://b"], lambda u: httpx.Response(503))
    assert (url, response.status_code) == ("http://b", 503)
    with pytest.raises(httpx.ConnectError):
        first_answer([], lambda u: httpx.Response(200))
