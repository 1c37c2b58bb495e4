"""A gateway-capable node's API port answers through every role change (`api.switch`).

Before, each role had its own server: between them (planning the first plan, a takeover,
handing the role over) nothing listened and clients got "connection refused" from a node
that was alive. One server now stays up and `RoleSwitch` picks the app per request.
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from fastapi import FastAPI

from butterfly.api.switch import RoleSwitch
from butterfly.metrics.events import MetricsEvent
from butterfly.types.ids import NodeId
from butterfly.wiring.api_server import ApiServer

pytestmark = [pytest.mark.timeout(60), pytest.mark.ports]


def named(name: str) -> FastAPI:
    api = FastAPI()

    @api.get("/who")
    def who() -> dict[str, str]:
        return {"app": name}

    return api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_one_socket_serves_every_role_and_503_between_them() -> None:
    port = free_port()
    events: list[MetricsEvent] = []
    front = RoleSwitch(3, health=lambda: {"acting_gateway": 0})
    server = ApiServer(front, "127.0.0.1", port, node=NodeId(3), emit=events.append)
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.serving:
                break
            await asyncio.sleep(0.01)
        assert server.serving
        # one keep-alive connection across the changes: it is never closed on the client
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            front.use(None, "is making the cluster's first plan")
            r = await client.get("/who")
            assert r.status_code == 503
            assert r.headers["Retry-After"] == "1"
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "service_unavailable"
            assert "node 3 is making the cluster's first plan" in error["message"]
            # /health keeps its shape: healthy false, with what the node says of gateways
            health = await client.get("/health")
            assert health.status_code == 503
            assert health.json()["healthy"] is False and health.json()["acting_gateway"] == 0
            assert health.json()["error"]["type"] == "service_unavailable"
            front.use(named("acting"))
            assert (await client.get("/who")).json() == {"app": "acting"}
            front.use(None, "hands the gateway role to node 1")
            r = await client.get("/who")
            assert r.status_code == 503 and "node 1" in r.json()["error"]["message"]
            front.use(named("standby"))
            assert (await client.get("/who")).json() == {"app": "standby"}
    finally:
        server.close()
        await asyncio.wait_for(serving, 10)
    assert serving.exception() is None
    assert not events  # bound at the first try: no restarts counted
