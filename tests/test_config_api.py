"""`/api/v1/config` over HTTP (in-process ASGI) on the 4-node in-memory cluster of
`test_config_agreement`: tokens, error shapes and statuses, history, rollback, sync, and
the gateway's own components' vetoes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import Depends, FastAPI

from butterfly.api import config_routes, errors
from butterfly.api.guards import BearerAuth
from butterfly.control.live_config import _check_tracing
from butterfly.metrics.tracing import Tracing
from tests.test_config_agreement import Cluster, cluster

__all__ = ["cluster"]  # the fixture, used by name below
TOKEN = "s3cret"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    errors.install(app, retry_after_s=1)
    auth = Depends(BearerAuth(frozenset({TOKEN})))
    gateway = cluster.nodes[0].coordinator
    app.include_router(config_routes.router(gateway, auth=auth, max_request_bytes=4096))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_changes_need_the_token_and_reads_do_not(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/v1/config", json={"partition.strategy": "uniform"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    view = (await client.get("/api/v1/config")).json()
    assert view["seq"] == 0 and view["in_sync"] and len(view["nodes"]) == 4
    r = await client.post(
        "/api/v1/config",
        json={"partition.strategy": "uniform"},
        headers=AUTH,
        params={"reason": "t"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seq"] == 1 and body["nodes"] == {str(i): "applied" for i in range(4)}
    assert body["changes"] == [
        {"key": "partition.strategy", "old": "load_balanced", "new": "uniform"}
    ]
    history = (await client.get("/api/v1/config/history", params={"limit": 1})).json()
    assert history[0]["cluster_seq"] == 1 and history[0]["reason"].endswith("t")


async def test_bad_input_gets_a_4xx_that_says_what_was_wrong(
    client: httpx.AsyncClient, cluster: Cluster
) -> None:
    cases = [
        ({"partition.strategey": "uniform"}, 400, "invalid_config", "did you mean"),
        ({"partition.strategy": "fastest"}, 400, "invalid_config", "partition.strategy"),
        ({"byzantine.f": 0}, 409, "update_refused", "restart required"),
        ({"partition.strategy": "load_balanced"}, 409, "update_refused", "does nothing"),
        ([1, 2], 400, "invalid_request", "JSON object"),
    ]
    for body, status, kind, text in cases:
        r = await client.post("/api/v1/config", json=body, headers=AUTH)
        assert r.status_code == status and r.json()["error"]["type"] == kind, (body, r.text)
        assert text in r.json()["error"]["message"], r.text
    r = await client.post("/api/v1/config", content=b"{", headers=AUTH)
    assert r.status_code == 400 and "not valid JSON" in r.text
    r = await client.post("/api/v1/config", content=b"x" * 5000, headers=AUTH)
    assert r.status_code == 413
    r = await client.post("/api/v1/config/rollback", json={"version": "1"}, headers=AUTH)
    assert r.status_code == 400
    assert all(n.driver.last_executed == 0 for n in cluster.nodes.values())  # nothing ordered


async def test_a_reject_names_the_node_and_rollback_is_a_new_version(
    client: httpx.AsyncClient, cluster: Cluster
) -> None:
    def veto(old: object, new: object) -> None:
        raise ValueError("not today")

    start = (await client.get("/api/v1/config")).json()
    await client.post("/api/v1/config", json={"scheduling.policy": "priority"}, headers=AUTH)
    unsubscribe = cluster.nodes[3].manager.subscribe("planner", lambda o, n: None, check=veto)
    r = await client.post("/api/v1/config", json={"scheduling.policy": "fifo"}, headers=AUTH)
    assert r.status_code == 409 and r.json()["node"] == 3 and "not today" in r.json()["reason"]
    unsubscribe()
    r = await client.post(
        "/api/v1/config/rollback", json={"version": start["version"]}, headers=AUTH
    )
    assert r.status_code == 200 and r.json()["seq"] == 2, r.text
    view = (await client.get("/api/v1/config")).json()
    assert view["cluster_hash"] == start["cluster_hash"] and view["in_sync"]
    sync = await client.post("/api/v1/config/sync", headers=AUTH)
    assert sync.status_code == 200 and sync.json()["in_sync"]
    assert set(sync.json()["nodes"].values()) == {"in sync"}


def tracer_without_exporter(cluster: Cluster) -> None:
    """The gateway's tracer as node.py subscribes it, on a node started without an OTLP
    endpoint: its check vetoes turning tracing on (README: spans would go nowhere)."""
    tracing = Tracing(node=0, exporter=None)
    cluster.nodes[0].manager.subscribe(
        "tracing",
        lambda old, new: tracing.retune(
            enabled=new.observability.tracing, sample_rate=new.observability.trace_sample_rate
        ),
        check=_check_tracing(tracing),
    )


async def test_a_component_veto_is_a_409_naming_the_option(
    client: httpx.AsyncClient, cluster: Cluster
) -> None:
    """A gateway-local option its component refuses was a 500 "internal" answer (the
    routes did not know `UpdateRejected`): it is a refusal like a node's REJECT, naming
    the option, the component and its reason."""
    tracer_without_exporter(cluster)
    r = await client.post("/api/v1/config", json={"observability.tracing": True}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["type"] == "update_rejected", r.text
    body = r.json()
    assert "observability.tracing" in body["error"]["message"]
    assert body["node"] == 0 and body["subscriber"] == "tracing"
    assert body["keys"] == ["observability.tracing"] and "otlp_endpoint" in body["reason"]
    assert not cluster.nodes[0].manager.current.observability.tracing


async def test_a_refused_mixed_change_applies_nothing_anywhere(
    client: httpx.AsyncClient, cluster: Cluster
) -> None:
    """One POST with a cluster-wide option and a gateway-local one the gateway's tracer
    refuses: the cluster-wide half was agreed and applied on every node before the local
    half was refused, so a 409 had changed the cluster. The gateway's components check
    the whole change before anything is ordered."""
    tracer_without_exporter(cluster)
    before = {i: n.manager.record.config_hash for i, n in cluster.nodes.items()}
    r = await client.post(
        "/api/v1/config",
        json={"partition.strategy": "uniform", "observability.tracing": True},
        headers=AUTH,
    )
    assert r.status_code == 409 and r.json()["error"]["type"] == "update_rejected", r.text
    assert {i: n.manager.record.config_hash for i, n in cluster.nodes.items()} == before
    assert all(n.driver.last_executed == 0 for n in cluster.nodes.values())  # nothing ordered


async def test_change_answers_redact_tokens_as_reads_do(client: httpx.AsyncClient) -> None:
    """The answers of the write routes listed `api.tokens` in clear: a rollback across a
    token change returned every token of both versions (and `config rollback --url`
    printed them). The key and the count still show."""
    secret = "another-clients-secret-token"
    start = (await client.get("/api/v1/config")).json()
    r = await client.post("/api/v1/config", json={"api.tokens": [secret]}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["changes"] == [{"key": "api.tokens", "old": [], "new": ["<redacted>"]}]
    assert secret not in (await client.get("/api/v1/config")).text
    r = await client.post(
        "/api/v1/config/rollback", json={"version": start["version"]}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    assert r.json()["changes"] == [{"key": "api.tokens", "old": ["<redacted>"], "new": []}]


async def test_rollback_beyond_sqlite_integers_is_a_4xx(
    client: httpx.AsyncClient, cluster: Cluster
) -> None:
    """`{"version": 2**70}` was a 500 (OverflowError in the history's query)."""
    r = await client.post("/api/v1/config/rollback", json={"version": 2**70}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["type"] == "update_refused", r.text
    assert f"no config version {2**70}" in r.json()["error"]["message"]
    assert (await client.get("/api/v1/config/history")).status_code == 200
    assert all(n.driver.last_executed == 0 for n in cluster.nodes.values())  # nothing ordered
