"""The gateway's HTTP side and scheduler follow a config change on the running app.

A real app (`create_app`) over a real scheduler and task store, subscribed to a
`ConfigManager` as the node subscribes them (`api.live.follow_config`); the engine holds
every task until the test lets it go, so what the scheduler dispatches, and in which
order, can be seen. Each test changes one option and observes what the next request or
dispatch does differently.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from butterfly.api.app import create_app
from butterfly.api.live import follow_config
from butterfly.api.settings import ApiSettings
from butterfly.config import ButterflyConfig, load_config
from butterfly.config.reload import ConfigManager
from butterfly.metrics.prometheus import Metrics
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.engine import ClusterHealth, TokenSink
from butterfly.schedule.queue import QueuePolicy
from butterfly.schedule.scheduler import Scheduler
from butterfly.schedule.store import TaskStore
from butterfly.types.errors import QueueFull
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceResult, InferenceTask

pytestmark = pytest.mark.timeout(60)
TOKEN = 66  # the held engine's every token: "B" in the tiny model's byte vocabulary


@dataclass
class HeldEngine:
    """Runs nothing: each task waits for `release`, then answers max_new_tokens ones."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: list[str] = field(default_factory=list)

    @property
    def max_context(self) -> int:
        return 64

    @property
    def input_kind(self) -> str:
        return "tokens"

    @property
    def generates(self) -> bool:
        return True

    async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        self.started.append(task.task_id)
        await self.release.wait()
        for _ in range(task.max_new_tokens):
            on_token(TOKEN)
        return InferenceResult(task.task_id, output_ids=(TOKEN,) * task.max_new_tokens)

    def health(self) -> ClusterHealth:
        return ClusterHealth(healthy=True, epoch=1)


@dataclass
class Gateway:
    manager: ConfigManager
    client: httpx.AsyncClient
    scheduler: Scheduler
    engine: HeldEngine
    unfollow: Callable[[], None]


def change(manager: ConfigManager, patch: dict[str, Any]) -> None:
    result = manager.update(patch)
    if result.pending is not None:
        manager.apply_committed(result.pending, manager.history.last_cluster_seq() + 1)


async def settle() -> None:
    """Let the event loop run what `call_soon_threadsafe` queued (the scheduler's retune)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def gateway(
    tmp_path: Path, codec: TextCodec | None = None, **settings: Any
) -> AsyncIterator[Gateway]:
    cfg = load_config(overrides=settings) if settings else ButterflyConfig()
    manager = ConfigManager(cfg)
    engine = HeldEngine()
    store = TaskStore(tmp_path / "tasks.sqlite")
    s, a = cfg.scheduling, cfg.api
    scheduler = Scheduler(  # as node.py builds it
        engine=engine,
        store=store,
        max_concurrent=s.dispatch_batch_size,
        queue_capacity=s.max_queue,
        policy=QueuePolicy(s.policy),
    )
    app = create_app(
        scheduler=scheduler,
        engine=engine,
        codec=codec,
        metrics=Metrics(),
        model_name="held",
        settings=ApiSettings(
            max_new_tokens_limit=s.max_new_tokens_limit,
            default_max_new_tokens=s.default_max_new_tokens,
            api_tokens=frozenset(a.tokens),
            rate_limit_per_s=a.rate_limit,
            rate_limit_burst=a.rate_limit_burst,
        ),
    )
    unfollow = follow_config(manager, app=app, scheduler=scheduler)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield Gateway(manager, client, scheduler, engine, unfollow)
    finally:
        engine.release.set()
        store.close()
        manager.history.close()


@pytest.fixture
async def gw(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    settings = getattr(request, "param", {})
    async for g in gateway(tmp_path, **settings):
        yield g


def with_settings(**settings: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("gw", [settings], indirect=True)


async def infer(gw: Gateway, client: str = "", **body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {client}"} if client else {}
    return await gw.client.post("/inference", json={"input_ids": [1, 2], **body}, headers=headers)


@with_settings(**{"api.tokens": ["old", "kept"]})
async def test_api_tokens_a_removed_token_is_refused(gw: Gateway) -> None:
    async def cancel(token: str) -> int:
        headers = {"authorization": f"Bearer {token}"}
        return (await gw.client.delete("/tasks/nope", headers=headers)).status_code

    assert await cancel("old") == 404  # let in: the task does not exist
    change(gw.manager, {"api.tokens": ["kept"]})
    assert await cancel("old") == 401
    assert await cancel("kept") == 404


async def test_an_api_whose_node_handed_the_role_on_is_retuned_no_more(gw: Gateway) -> None:
    """Each time a node took the gateway role, another app and scheduler were subscribed
    and the old ones kept being retuned (a review): the role's end unsubscribes them."""
    gw.unfollow()
    change(gw.manager, {"api.tokens": ["new"], "scheduling.max_queue": 1})
    assert (await infer(gw)).status_code == 202  # no token asked: not retuned
    await settle()
    assert (await infer(gw)).status_code == 202  # nor the queue's size


# "a" and "b" are tokens: each holder is its own client (unverified headers are not)
@with_settings(**{"api.rate_limit": 0.0, "api.rate_limit_burst": 1, "api.tokens": ["a", "b"]})
async def test_api_rate_limit_applies_to_the_next_request(gw: Gateway) -> None:
    assert [(await infer(gw, "a")).status_code for _ in range(3)] == [202] * 3  # limit off
    change(gw.manager, {"api.rate_limit": 0.01})
    assert [(await infer(gw, "b")).status_code for _ in range(3)] == [202, 429, 429]


@with_settings(**{"api.rate_limit": 0.01, "api.rate_limit_burst": 1, "api.tokens": ["a", "b"]})
async def test_api_rate_limit_burst_applies(gw: Gateway) -> None:
    assert [(await infer(gw, "a")).status_code for _ in range(3)] == [202, 429, 429]
    change(gw.manager, {"api.rate_limit_burst": 3})
    assert [(await infer(gw, "b")).status_code for _ in range(3)] == [202] * 3


@with_settings(**{"scheduling.default_max_new_tokens": 2})
async def test_scheduling_max_new_tokens_limit_applies(gw: Gateway) -> None:
    assert (await infer(gw, max_new_tokens=10)).status_code == 202
    change(gw.manager, {"scheduling.max_new_tokens_limit": 5})
    refused = await infer(gw, max_new_tokens=10)
    assert refused.status_code == 400 and "between 1 and 5" in refused.text


async def test_scheduling_default_max_new_tokens_applies(gw: Gateway) -> None:
    async def default_tokens() -> int:
        r = await infer(gw)
        assert r.status_code == 202, r.text
        snap = await gw.scheduler.snapshot(RequestId(r.json()["task_id"]))
        return snap.task.max_new_tokens

    before = await default_tokens()
    change(gw.manager, {"scheduling.default_max_new_tokens": 3})
    assert (before, await default_tokens()) == (63, 3)  # 63: what the context leaves


@with_settings(**{"scheduling.dispatch_batch_size": 1})
async def test_scheduling_policy_reorders_waiting_tasks(gw: Gateway) -> None:
    ids = []
    for priority in (0, 0, 5, 9):  # the first runs at once and holds the only slot
        r = await infer(gw, priority=priority)
        ids.append(r.json()["task_id"])
    async with asyncio.TaskGroup() as tg:
        tg.create_task(gw.scheduler.run())
        await settle()
        assert gw.engine.started == ids[:1]
        change(gw.manager, {"scheduling.policy": "priority"})
        await settle()
        gw.engine.release.set()
        async with asyncio.timeout(30):
            while len(gw.engine.started) < 4:
                await asyncio.sleep(0.01)
        gw.scheduler.shutdown()
    assert gw.engine.started == [ids[0], ids[3], ids[2], ids[1]]  # fifo would be ids


@with_settings(**{"scheduling.max_queue": 2})
async def test_scheduling_max_queue_applies(gw: Gateway) -> None:
    codes = [(await infer(gw)).status_code for _ in range(3)]
    assert codes == [202, 202, 429]
    change(gw.manager, {"scheduling.max_queue": 4})
    await settle()
    assert [(await infer(gw)).status_code for _ in range(3)] == [202, 202, 429]
    with pytest.raises(QueueFull):
        await gw.scheduler.submit(InferenceTask(RequestId("x"), input_ids=(1,), max_new_tokens=1))


@with_settings(**{"scheduling.dispatch_batch_size": 1})
async def test_scheduling_dispatch_batch_size_applies(gw: Gateway) -> None:
    for _ in range(4):
        assert (await infer(gw)).status_code == 202
    async with asyncio.TaskGroup() as tg:
        tg.create_task(gw.scheduler.run())
        await settle()
        assert len(gw.engine.started) == 1
        change(gw.manager, {"scheduling.dispatch_batch_size": 3})
        await settle()
        assert len(gw.engine.started) == 3
        gw.engine.release.set()
        gw.scheduler.shutdown()


@with_settings(**{"api.tokens": ["t"]})
async def test_api_metrics_public_opens_metrics_only(gw: Gateway) -> None:
    assert (await gw.client.get("/metrics")).status_code == 401
    change(gw.manager, {"api.metrics_public": True})
    assert (await gw.client.get("/metrics")).status_code == 200
    assert (await infer(gw)).status_code == 401  # nothing else opened with it
    change(gw.manager, {"api.metrics_public": False})
    assert (await gw.client.get("/metrics")).status_code == 401


async def test_api_max_prompt_bytes_applies_to_the_next_request(
    tmp_path: Path, tiny_model: Path
) -> None:
    async for gw in gateway(tmp_path, codec=TextCodec.load(tiny_model)):
        body = {"prompt": "x" * 40, "max_new_tokens": 1}
        assert (await gw.client.post("/inference", json=body)).status_code == 202
        change(gw.manager, {"api.max_prompt_bytes": 32})
        r = await gw.client.post("/inference", json=body)
        assert r.status_code == 413 and "at most 32 bytes" in r.json()["error"]["message"]


def sse_text(body: str) -> tuple[list[str], list[str]]:
    """The text of each `data:` chunk of an SSE body, and its comment lines."""
    texts, comments = [], []
    for block in filter(None, body.split("\n\n")):
        if block.startswith(":"):
            comments.append(block)
        elif block != "data: [DONE]":
            texts.append(json.loads(block.removeprefix("data: "))["choices"][0]["text"])
    return texts, comments


async def test_api_stream_verified_only_applies_to_the_next_stream(
    tmp_path: Path, tiny_model: Path
) -> None:
    async for gw in gateway(tmp_path, codec=TextCodec.load(tiny_model)):
        gw.engine.release.set()
        body = {"model": "held", "prompt": "x", "max_tokens": 3, "stream": True}
        async with asyncio.TaskGroup() as tg:
            tg.create_task(gw.scheduler.run())
            streamed = sse_text((await gw.client.post("/v1/completions", json=body)).text)
            change(gw.manager, {"api.stream_verified_only": True})
            held = sse_text((await gw.client.post("/v1/completions", json=body)).text)
            gw.scheduler.shutdown()
        assert streamed == (["B", "B", "B", ""], [])  # a chunk per token, then the last
        assert held == (["BBB"], [": held"] * 3)  # nothing but comments until it finished
