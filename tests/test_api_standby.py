"""A standby gateway's API points every client on, its schema and docs included."""

from __future__ import annotations

import httpx
import pytest

from butterfly.api.standby import standby_app

ACTING = "http://10.0.0.2:8081"


def client(url: str | None = ACTING) -> httpx.AsyncClient:
    app = standby_app(acting=lambda: 1, acting_url=lambda: url, health=lambda: {"acting": 1})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://standby")


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/v1/models", "/result/abc?x=1"])
async def test_every_path_but_health_redirects_to_the_acting_gateway(path: str) -> None:
    """A client generated from a standby's /openapi.json got the standby's own schema,
    which described only its catch-all route."""
    async with client() as c:
        r = await c.get(path)
    assert r.status_code == 307
    assert r.headers["location"] == f"{ACTING}{path}"


async def test_health_answers_here_and_an_unknown_acting_url_is_a_503() -> None:
    async with client() as c:
        assert (await c.get("/health")).json() == {"healthy": False, "acting": 1}
    async with client(None) as c:
        r = await c.get("/openapi.json")
    assert r.status_code == 503 and "node 1 acts" in r.json()["error"]["message"]


async def test_head_is_answered_as_get_and_other_methods_in_the_contracts_shape() -> None:
    """A load balancer probes with `HEAD /health`: a standby answered it (and HEAD on
    every route) 405, and its 405s were FastAPI's `{"detail": ...}`, outside the
    contract's error shape (a review)."""
    async with client() as c:
        health, other = await c.head("/health"), await c.head("/v1/models")
        refused = await c.request("OPTIONS", "/v1/models")
    assert health.status_code == 503  # as GET /health: this node serves no tasks
    assert (other.status_code, other.headers["location"]) == (307, f"{ACTING}/v1/models")
    assert refused.status_code == 405
    assert refused.json()["error"]["type"] == "method_not_allowed"
    assert "HEAD" in refused.headers["allow"]
