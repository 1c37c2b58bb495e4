"""The gateway's role options reach the standby gateways, so a takeover keeps them.

On the 4-node in-memory cluster of `test_config_agreement` (gateways: nodes 0 and 1): an
option of the gateway's role (its API's tokens and limits, its queue, generation, and
tracing) changed through the acting gateway is handed to the standby, which serves with
it once it takes over. What each test protects is a takeover that would otherwise bring
back what the operator changed: a revoked token, a lifted rate limit, tracing turned off.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from butterfly.agreement.gateway_options import ALREADY
from butterfly.api.app import create_app
from butterfly.api.live import follow_config
from butterfly.api.settings import ApiSettings
from butterfly.config import UpdateRefused
from butterfly.control.live_config import _check_tracing
from butterfly.metrics.prometheus import Metrics
from butterfly.metrics.tracing import Tracing
from butterfly.schedule.queue import QueuePolicy
from butterfly.schedule.scheduler import Scheduler
from butterfly.schedule.store import TaskStore
from butterfly.types.ids import NodeId
from tests.test_config_agreement import Cluster, cluster
from tests.test_live_config_api import HeldEngine

__all__ = ["cluster"]  # the fixture, used by name below
pytestmark = pytest.mark.timeout(60)
LIMIT = {"api.rate_limit": 0.01, "api.rate_limit_burst": 1}


@asynccontextmanager
async def taken_over(cluster: Cluster, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """Node 0 is gone and node 1 acts: its app and scheduler, built from its config and
    following it as `wiring.gateway` builds them when it takes the role."""
    manager = cluster.nodes[1].manager
    engine, store = HeldEngine(), TaskStore(tmp_path / "tasks.sqlite")
    s = manager.current.scheduling
    scheduler = Scheduler(
        engine=engine, store=store, max_concurrent=s.dispatch_batch_size,
        queue_capacity=s.max_queue, policy=QueuePolicy(s.policy),
    )  # fmt: skip
    app = create_app(
        scheduler=scheduler, engine=engine, codec=None, metrics=Metrics(), model_name="held",
        settings=ApiSettings(),
    )  # fmt: skip
    unfollow = follow_config(manager, app=app, scheduler=scheduler)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield client
    finally:
        unfollow()
        engine.release.set()
        store.close()


async def infer(client: httpx.AsyncClient, token: str = "") -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"input_ids": [1, 2]}
    return (await client.post("/inference", json=body, headers=headers)).status_code


async def test_a_standby_that_missed_a_role_option_is_given_it_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A standby unreachable when a limit was set keeps its own values; sending the same
    values again was refused as "the change does nothing" (the gateway compared them with
    its own config only), so nothing could bring the standby in line and the next
    takeover served without the limit. They go to the standby, and only a change in force
    on every gateway is refused."""
    gateway = cluster.nodes[0].coordinator
    cluster.net.down.add(NodeId(1))
    first = await gateway.update(LIMIT)
    assert first.nodes[1].startswith("unreachable"), first.nodes
    cluster.net.down.discard(NodeId(1))
    again = await gateway.update(LIMIT)  # the operator read the answer and sends it again
    assert again.nodes == {0: ALREADY, 1: "applied"} and again.seq == 0
    with pytest.raises(UpdateRefused, match="does nothing"):
        await gateway.update(LIMIT)
    async with taken_over(cluster, tmp_path) as client:
        assert [await infer(client) for _ in range(3)] == [202, 429, 429]


async def test_a_revoked_token_stays_revoked_after_a_takeover(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The security side of the same gap: a token revoked while the standby was away
    came back the moment it took over. Revoked again (a no-op on the acting gateway), it
    is revoked on the standby too."""
    gateway = cluster.nodes[0].coordinator
    await gateway.update({"api.tokens": ["kept", "leaked"]})
    cluster.net.down.add(NodeId(1))
    await gateway.update({"api.tokens": ["kept"]})
    cluster.net.down.discard(NodeId(1))
    await gateway.update({"api.tokens": ["kept"]})
    async with taken_over(cluster, tmp_path) as client:
        assert await infer(client, "leaked") == 401
        assert await infer(client, "kept") == 202


def traced(cluster: Cluster, i: int, *, exports: bool = True) -> Tracing:
    """Node i's tracer, following its config as node.py subscribes it (with its check:
    no exporter, no tracing turned on)."""
    tracing = Tracing(node=i, exporter=InMemorySpanExporter() if exports else None)
    cluster.nodes[i].manager.subscribe(
        "tracing",
        lambda old, new: tracing.retune(
            enabled=new.observability.tracing, sample_rate=new.observability.trace_sample_rate
        ),
        check=_check_tracing(tracing),
    )
    return tracing


async def test_tracing_turned_on_through_the_api_survives_a_takeover(cluster: Cluster) -> None:
    """The acting gateway starts every trace and draws the sample: tracing turned on
    through the API was left on the acting gateway alone, and the cluster stopped tracing
    at the next takeover. The standby takes it, as it takes the API's options."""
    acting, standby = traced(cluster, 0), traced(cluster, 1)
    r = await cluster.nodes[0].coordinator.update(
        {"observability.tracing": True, "observability.trace_sample_rate": 1.0}
    )
    assert r.nodes[1] == "applied", r.nodes
    assert acting.start_request("r1", {}) is not None
    # node 0 dies; node 1 acts with its own tracer, as it now is
    assert standby.start_request("r2", {}) is not None, "the new gateway traces nothing"


async def test_a_standby_refusing_tracing_still_takes_the_tokens(cluster: Cluster) -> None:
    """A standby without an OTLP endpoint refuses tracing (spans would go nowhere); the
    tokens sent with it in one request still apply there, or the revoked one came back at
    the takeover; the answer says what the standby refused."""
    traced(cluster, 0)
    traced(cluster, 1, exports=False)
    r = await cluster.nodes[0].coordinator.update(
        {"api.tokens": ["kept"], "observability.tracing": True}
    )
    assert r.nodes[1].startswith("failed") and "observability.tracing" in r.nodes[1], r.nodes
    standby = cluster.nodes[1].manager.current
    assert standby.api.tokens == ("kept",) and not standby.observability.tracing
