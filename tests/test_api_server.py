"""A gateway's API whose port is taken waits and binds again; the node lives on.

uvicorn answers a port it cannot bind with `SystemExit`, which an asyncio task hands to
the event loop: the acting gateway that took over on a taken port died with all its
other roles. `wiring.api_server.ApiServer` logs it, counts it and tries again.
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from fastapi import FastAPI

from butterfly.metrics.events import LoopRestarted, MetricsEvent
from butterfly.types.ids import NodeId
from butterfly.wiring.api_server import ApiServer

pytestmark = pytest.mark.timeout(60)


def occupied_port() -> socket.socket:
    """A socket listening on a free loopback port: the port is taken until it closes."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def app() -> FastAPI:
    api = FastAPI()

    @api.get("/ping")
    def ping() -> dict[str, str]:
        return {"pong": "yes"}

    return api


async def test_a_taken_port_is_retried_until_it_is_free_and_then_served() -> None:
    holder = occupied_port()
    port = holder.getsockname()[1]
    events: list[MetricsEvent] = []
    server = ApiServer(
        app(), "127.0.0.1", port, node=NodeId(1), emit=events.append, delay=lambda _: 0.05
    )
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(400):
            if server.bind_failures >= 2 or serving.done():
                break
            await asyncio.sleep(0.02)
        assert not serving.done(), "a bind failure ended the API's loop (and the node with it)"
        assert server.bind_failures >= 2
        assert LoopRestarted("api") in events
        holder.close()  # the other process lets go of the port
        for _ in range(400):
            if server.serving:
                break
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{port}/ping", timeout=10)
        assert r.status_code == 200 and r.json() == {"pong": "yes"}
    finally:
        holder.close()
        server.close()
        await asyncio.wait_for(serving, 10)
    assert serving.exception() is None


async def test_close_during_the_backoff_ends_the_loop_at_once() -> None:
    holder = occupied_port()
    events: list[MetricsEvent] = []
    server = ApiServer(
        app(),
        "127.0.0.1",
        holder.getsockname()[1],
        node=NodeId(0),
        emit=events.append,
        delay=lambda _: 3600.0,
    )
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(400):
            if server.bind_failures:
                break
            await asyncio.sleep(0.02)
        assert server.bind_failures == 1
        server.close()
        await asyncio.wait_for(serving, 10)  # not an hour
        assert not server.serving
    finally:
        holder.close()
