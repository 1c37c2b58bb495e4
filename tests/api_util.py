"""Test harness for the gateway API: a real app over a real scheduler, engine and store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from butterfly.agreement.config_coordinator import ConfigCoordinator
from butterfly.api.app import create_app
from butterfly.api.settings import ApiSettings
from butterfly.metrics.prometheus import Metrics
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.engine import ClusterHealth
from butterfly.schedule.scheduler import Scheduler
from butterfly.schedule.store import TaskStore
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.model import LayerRange
from butterfly.types.tasks import SamplingParams

SPLIT = [LayerRange(0, 2), LayerRange(2, 4)]


class BrokenHealthEngine(LocalPipeline):
    """A faulty part: an engine whose health report raises, as a bug would."""

    def health(self) -> ClusterHealth:
        raise RuntimeError("health probe exploded")


@dataclass
class Served:
    client: httpx.AsyncClient
    scheduler: Scheduler
    metrics: Metrics
    codec: TextCodec
    app: FastAPI


@asynccontextmanager
async def serving(
    model: Path,
    db: Path,
    *,
    settings: ApiSettings | None = None,
    run: bool = True,
    engine_type: type[LocalPipeline] = LocalPipeline,
    codec: TextCodec | None = None,
    config: ConfigCoordinator | None = None,
    client: tuple[str, int] = ("127.0.0.1", 123),
    **scheduler_kw: Any,
) -> AsyncIterator[Served]:
    """`codec` replaces the model's own (a composed tokenizer), `config` adds the config
    routes, `client` is the address requests come from."""
    codec = codec or TextCodec.load(model)
    async with (
        engine_type(model, SPLIT, stop_ids=codec.eos_ids, tokenizer=codec.tokenizer) as engine,
        _app(engine, codec, db, settings, run, scheduler_kw, config, client) as served,
    ):
        yield served


@asynccontextmanager
async def _app(
    engine: LocalPipeline,
    codec: TextCodec,
    db: Path,
    settings: ApiSettings | None,
    run: bool,
    scheduler_kw: dict[str, Any],
    config: ConfigCoordinator | None = None,
    client: tuple[str, int] = ("127.0.0.1", 123),
) -> AsyncIterator[Served]:
    store, metrics = TaskStore(db), Metrics()
    scheduler = Scheduler(
        engine=engine, store=store, emit=metrics.emit, detokenize=codec.continuation, **scheduler_kw
    )
    app = create_app(
        scheduler=scheduler,
        engine=engine,
        codec=codec,
        metrics=metrics,
        model_name="tiny",
        settings=settings or ApiSettings(max_request_bytes=64 * 1024),
        config=config,
    )
    transport = httpx.ASGITransport(app=app, client=client)
    try:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://localhost") as client,
            asyncio.TaskGroup() as tg,
        ):
            if run:
                tg.create_task(scheduler.run())
                await asyncio.sleep(0)  # let run() start, so /health sees it serving
            try:
                yield Served(client, scheduler, metrics, codec, app)
            finally:
                scheduler.shutdown()
    finally:
        store.close()


def reference(model: Path, ids: list[int], n: int, sampling: SamplingParams) -> list[int]:
    codec = TextCodec.load(model)
    return list(generate([load_stage(model)], ids, n, sampling, codec.eos_ids))


def assert_error(r: httpx.Response, status: int, kind: str, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"type", "message", "param", "code"}
    assert body["error"]["type"] == kind, body
    for word in words:
        assert word in body["error"]["message"], (word, body)


async def still_serves(s: Served, headers: dict[str, str] | None = None) -> None:
    body = {"prompt": "ok?", "max_new_tokens": 2, "wait": True}
    r = await s.client.post("/inference", json=body, headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "completed"


def body_then_hang_up(body: str, hang_up: asyncio.Event) -> Callable[[], Awaitable[Any]]:
    """An ASGI `receive`: the request's body, then the client's hang-up once it is set."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body.encode(), "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    return receive


def raw_scope(path: str) -> dict[str, Any]:
    """An ASGI request's scope as uvicorn gives it (the test client buffers whole
    responses, so a hang-up is sent by hand)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("gw", 80),
        "scheme": "http",
        "root_path": "",
    }


async def statuses_of_a_client_hanging_up(s: Served, path: str, body: dict[str, Any]) -> list[int]:
    """POST `body` to `path` as raw ASGI, the client hanging up once a task runs: the
    statuses the app began responses with (none read by the client)."""
    hang_up, statuses = asyncio.Event(), []
    receive = body_then_hang_up(json.dumps(body), hang_up)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def hang_up_once_running() -> None:
        for _ in range(2000):  # bounded: the first task runs within seconds
            if (await s.client.get("/health")).json()["active_tasks"]:
                break
            await asyncio.sleep(0.005)
        hang_up.set()

    watcher = asyncio.create_task(hang_up_once_running())
    async with asyncio.timeout(60):
        await s.app(raw_scope(path), receive, send)
    await watcher
    return statuses
