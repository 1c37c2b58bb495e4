"""`--url` of the config and membership commands may name a standby gateway
(cli.config_remote.call follows its 307 to the acting one)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import typer

from butterfly.cli import config_remote

ACTING = {"config": {"cluster": {"members": ["a:1"], "public_keys": ["k"]}}}


def _route(monkeypatch: pytest.MonkeyPatch, handler: Any) -> list[tuple[str, str]]:
    """Send `httpx.request` through `handler`, recording (method, url) of every hop."""
    seen: list[tuple[str, str]] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, str(request.url)))
        response: httpx.Response = handler(request)
        return response

    def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
        with httpx.Client(transport=httpx.MockTransport(record)) as client:
            return client.request(method, url, **kwargs)

    monkeypatch.setattr(config_remote.httpx, "request", request)
    return seen


def test_a_standby_gateways_redirect_is_followed_with_the_method_and_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "standby":
            return httpx.Response(307, headers={"Location": f"http://acting{request.url.path}"})
        if request.method == "POST":
            return httpx.Response(200, json={"body": request.content.decode()})
        return httpx.Response(200, json=ACTING)

    seen = _route(monkeypatch, handler)
    assert config_remote.call("GET", "http://standby", "/api/v1/config") == ACTING
    posted = config_remote.call("POST", "http://standby", "/api/v1/config", body={"x": 1})
    assert posted == {"body": '{"x":1}'}
    assert [m for m, _ in seen] == ["GET", "GET", "POST", "POST"]


def test_an_answer_that_is_not_a_success_is_an_error_not_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A redirect that leads nowhere (too many hops) exits 2 rather than being returned."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(304)

    _route(monkeypatch, handler)
    with pytest.raises(typer.Exit) as exit_info:
        config_remote.call("GET", "http://standby", "/api/v1/config")
    assert exit_info.value.exit_code == 2
