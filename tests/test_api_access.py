"""The gateway's door, tried as an attacker would (issue 12, items 6 and 7).

- With `api.tokens` set, every route of the app (walked from `app.routes`, so a route
  added later is covered without editing this file) refuses a request without a valid
  bearer token, except `/health`, and `/metrics` only with `api.metrics_public`.
- The rate limit is keyed on the verified principal or the address: a made-up
  `Authorization` header per request used to get a fresh bucket (0 of 30 limited).
- A prompt too long to fit the context is refused before it is tokenized, and a long
  one that is allowed is tokenized off the event loop: other requests are served while
  it is.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route

from butterfly.api.guards import address_of
from butterfly.api.settings import ApiSettings
from butterfly.runtime.tokenizer import TextCodec
from tests.api_util import Served, assert_error, serving
from tests.test_config_agreement import Cluster, cluster

__all__ = ["cluster"]  # the fixture, used by name below
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def endpoints(s: Served) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, path parameters filled in: its API routes
    from its OpenAPI schema (FastAPI keeps included routers' routes out of `app.routes`),
    and its plain routes (the schema and docs pages) from `app.routes`."""
    found = [
        (method.upper(), path)
        for path, operations in s.app.openapi()["paths"].items()
        for method in operations
    ]
    for route in s.app.routes:
        if isinstance(route, Route) and not isinstance(route, APIRoute):
            found += [(m, route.path) for m in sorted(route.methods or ())]
    return [(m, re.sub(r"\{[^}]+\}", "x", p)) for m, p in found]


@pytest.fixture
async def guarded(tiny_model: Path, tmp_path: Path, cluster: Cluster) -> AsyncIterator[Served]:
    """The whole app, config routes included, with a token set."""
    settings = ApiSettings(api_tokens=frozenset({TOKEN}))
    coordinator = cluster.nodes[0].coordinator
    async with serving(
        tiny_model, tmp_path / "t.db", settings=settings, run=False, config=coordinator
    ) as s:
        yield s


async def test_every_route_but_health_needs_the_token(guarded: Served) -> None:
    routes = endpoints(guarded)
    for known in ["POST /api/v1/config", "POST /v1/completions", "GET /openapi.json"]:
        assert tuple(known.split()) in routes, routes
    assert len(routes) >= 20, routes
    open_without_token = []
    for method, path in [*routes, ("GET", "/nowhere")]:
        for headers in ({}, {"authorization": "Bearer made-up"}, {"authorization": TOKEN}):
            r = await guarded.client.request(method, path, headers=headers)
            if r.status_code != 401:
                open_without_token.append((method, path, headers, r.status_code))
            elif method != "HEAD":
                assert r.json()["error"]["type"] == "unauthorized", r.text
                assert r.headers["www-authenticate"] == "Bearer"
    # only the load balancer's probe; nothing else answered a caller without the token
    assert {(m, p) for m, p, _, _ in open_without_token} <= {
        ("GET", "/health"),
        ("HEAD", "/health"),
    }
    assert ("GET", "/health") in {(m, p) for m, p, _, _ in open_without_token}
    let_in = [
        (m, p, (await guarded.client.request(m, p, headers=AUTH)).status_code)
        for m, p in routes
        if (m, p) != ("POST", "/api/v1/config/sync")  # would run a sync: not this test's
    ]
    assert all(status != 401 for _, _, status in let_in), let_in


@pytest.mark.parametrize("public", [False, True])
async def test_metrics_need_the_token_unless_configured_public(
    tiny_model: Path, tmp_path: Path, public: bool
) -> None:
    settings = ApiSettings(api_tokens=frozenset({TOKEN}), metrics_public=public)
    async with serving(tiny_model, tmp_path / "t.db", settings=settings, run=False) as s:
        assert (await s.client.get("/metrics")).status_code == (200 if public else 401)
        assert (await s.client.get("/metrics", headers=AUTH)).status_code == 200
        assert (await s.client.get("/v1/models")).status_code == 401


async def test_openai_routes_take_a_bearer_token(tiny_model: Path, tmp_path: Path) -> None:
    settings = ApiSettings(api_tokens=frozenset({TOKEN}))
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    async with serving(tiny_model, tmp_path / "t.db", settings=settings) as s:
        for headers in ({}, {"authorization": f"Basic {TOKEN}"}, {"x-api-key": TOKEN}):
            r = await s.client.post("/v1/completions", json=body, headers=headers)
            assert_error(r, 401, "unauthorized")
        r = await s.client.post("/v1/completions", json=body, headers=AUTH)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        assert (await s.client.get("/v1/models", headers=AUTH)).json()["data"][0]["id"] == "tiny"


async def limited(s: Served, headers: list[dict[str, str]]) -> int:
    """How many of these requests (one per header set) got 429."""
    codes = [
        (await s.client.post("/inference", json={"input_ids": [1]}, headers=h)).status_code
        for h in headers
    ]
    assert set(codes) <= {202, 429}, codes
    return codes.count(429)


async def test_made_up_authorization_headers_do_not_bypass_the_rate_limit(
    tiny_model: Path, tmp_path: Path
) -> None:
    """No tokens configured: each request carries a different made-up header, as in the
    attack of issue 12 (0 of 30 limited), and a different X-Forwarded-For (README: not a
    new client); they all come from one address."""
    settings = ApiSettings(rate_limit_per_s=0.001, rate_limit_burst=5)
    made_up = [
        {"authorization": f"Bearer forged-{i}", "x-forwarded-for": f"10.9.{i}.1"} for i in range(30)
    ]
    async with serving(tiny_model, tmp_path / "t.db", settings=settings, run=False) as s:
        assert await limited(s, made_up) == 25
    async with serving(  # another address is another client
        tiny_model, tmp_path / "u.db", settings=settings, run=False, client=("10.1.2.3", 9)
    ) as other:
        assert await limited(other, [{}] * 6) == 1


async def test_the_rate_limit_follows_the_verified_principal(
    tiny_model: Path, tmp_path: Path
) -> None:
    settings = ApiSettings(
        rate_limit_per_s=0.001, rate_limit_burst=5, api_tokens=frozenset({"one", "two"})
    )
    async with serving(tiny_model, tmp_path / "t.db", settings=settings, run=False) as s:
        assert await limited(s, [{"authorization": "Bearer one"}] * 30) == 25
        assert await limited(s, [{"authorization": "Bearer two"}] * 6) == 1  # its own bucket


def test_ipv6_clients_are_counted_by_their_64() -> None:
    assert address_of("2001:db8::1") == address_of("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_of("2001:db8:0:1::1") != address_of("2001:db8::1")
    assert address_of("::ffff:10.0.0.1") == address_of("10.0.0.1") == "10.0.0.1"
    assert address_of("testclient") == "testclient"


class WatchedTokenizer:
    """The model's tokenizer, counting calls; with a `gate`, each call waits for it (in
    whatever thread the gateway runs it)."""

    def __init__(self, real: Any, gate: threading.Event | None = None) -> None:
        self.real, self.gate, self.calls = real, gate, 0
        self.inside = threading.Event()

    def encode_batch(self, texts: list[str], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.inside.set()
        if self.gate is not None and not self.gate.wait(30):
            raise AssertionError("never let go: the event loop was blocked meanwhile")
        return self.real.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def watched(model: Path, gate: threading.Event | None = None) -> tuple[TextCodec, Any]:
    real = TextCodec.load(model)
    tokenizer = WatchedTokenizer(real.tokenizer, gate)
    return TextCodec(tokenizer, real.eos_ids), tokenizer  # type: ignore[arg-type]


async def test_an_oversized_prompt_is_refused_before_it_is_tokenized(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The tiny model: context 512, longest vocabulary entry 7 bytes, so 3584 bytes."""
    codec, tokenizer = watched(tiny_model)
    settings = ApiSettings(max_request_bytes=8 << 20)
    async with serving(tiny_model, tmp_path / "t.db", settings=settings, codec=codec) as s:
        for prompt in ("x" * 3585, "é" * 1793, "x" * (5 << 20)):
            r = await s.client.post("/inference", json={"prompt": prompt})
            assert_error(r, 400, "invalid_request", "at most 3584 bytes", "512 tokens")
            r = await s.client.post("/v1/completions", json={"model": "tiny", "prompt": prompt})
            assert_error(r, 400, "invalid_request", "3584")  # a full context, as OpenAI says:
            assert r.json()["error"]["code"] == "context_length_exceeded"  # not a 413
        assert tokenizer.calls == 0
        huge_ids = {"input_ids": [1] * 600_000}  # past the context: refused unscanned
        assert_error(await s.client.post("/inference", json=huge_ids), 400, "invalid_request")
        r = await s.client.post("/inference", json={"prompt": "x" * 600})  # fits the bytes
        assert_error(r, 400, "invalid_request", "601", "512")  # but not the context
        assert tokenizer.calls == 1
    settings = ApiSettings(max_prompt_bytes=100)
    async with serving(tiny_model, tmp_path / "u.db", settings=settings) as s:
        r = await s.client.post("/inference", json={"prompt": "x" * 101})
        assert_error(r, 413, "payload_too_large", "at most 100 bytes", "api.max_prompt_bytes")


async def test_a_long_prompt_is_tokenized_while_the_gateway_serves_others(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The tokenizer is held inside its call until /health has been answered: were it
    called on the event loop, /health could not be served until it returned."""
    gate = threading.Event()
    codec, tokenizer = watched(tiny_model, gate)
    async with serving(tiny_model, tmp_path / "t.db", codec=codec, run=False) as s:
        body = {"prompt": "a long prompt " * 30, "max_new_tokens": 1}
        long = asyncio.create_task(s.client.post("/inference", json=body))
        for _ in range(3000):
            if tokenizer.inside.is_set() or long.done():
                break
            await asyncio.sleep(0.01)
        assert tokenizer.inside.is_set() and not long.done()
        health = await s.client.get("/health")  # answered while the tokenizer works
        assert health.status_code == 503 and not gate.is_set()  # 503: nothing dispatches
        assert not long.done()
        gate.set()
        assert (await long).status_code == 202
