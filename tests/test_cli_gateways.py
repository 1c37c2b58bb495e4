"""`--url A,B,C`: which address a client's request ends at (cli.gateways)."""

from __future__ import annotations

import httpx
import pytest

from butterfly.cli.gateways import first_answer, parse_urls, wait_result


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


class FakeTime:
    """A clock that moves only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_round_where_no_gateway_accepts_is_tried_again_while_patience_lasts() -> None:
    """During a takeover the dead gateway refuses and the standby redirects to it (or
    answers 503): `infer` used to give up at once with 'cannot reach'."""
    t = FakeTime()
    tried: list[str] = []

    def send(url: str) -> httpx.Response:
        tried.append(url)
        if t.now < 2.0:
            raise httpx.ConnectError("refused")
        return httpx.Response(202 if url == "http://b" else 503)

    url, response = first_answer(
        ["http://a", "http://b"], send, patience_s=10.0, clock=t.clock, sleep=t.sleep
    )
    assert (url, response.status_code) == ("http://b", 202)
    assert t.slept == [1.0, 1.0]
    with pytest.raises(httpx.ConnectError):  # patience is bounded
        first_answer(["http://a"], _refuse, patience_s=3.0, clock=t.clock, sleep=t.sleep)


def _refuse(url: str) -> httpx.Response:
    raise httpx.ConnectError("refused")


def test_a_result_is_read_from_the_next_gateway_when_the_first_dies_mid_answer() -> None:
    """The acting gateway is killed while the client waits on its task: the read fails
    mid-answer, and the successor, which finished the task, answers it."""
    t = FakeTime()
    asked: list[tuple[str, str]] = []
    answers = {"http://a": [httpx.Response(202), httpx.RemoteProtocolError("closed")]}

    def get(url: str, path: str) -> httpx.Response:
        asked.append((url, path))
        queue = answers.get(url)
        if queue:
            answer = queue.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        if url == "http://a":
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"task_id": "t1", "text": "done"})

    response = wait_result(
        ["http://a", "http://b"], "t1", get, limit_s=60.0, clock=t.clock, sleep=t.sleep
    )
    assert response.json()["text"] == "done"
    assert [u for u, _ in asked] == ["http://a", "http://a", "http://b"]
    assert all(p.startswith("/result/t1?wait=") for _, p in asked)


def test_waiting_for_a_result_is_bounded_and_an_error_answer_is_final() -> None:
    t = FakeTime()
    with pytest.raises(TimeoutError, match="t2"):
        wait_result(
            ["http://a"],
            "t2",
            lambda u, p: httpx.Response(503),
            limit_s=5.0,
            clock=t.clock,
            sleep=t.sleep,
        )
    assert t.now >= 5.0
    failed = wait_result(
        ["http://a"],
        "t3",
        lambda u, p: httpx.Response(500),
        limit_s=5.0,
        clock=t.clock,
        sleep=t.sleep,
    )
    assert failed.status_code == 500
