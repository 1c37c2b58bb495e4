"""KV caches are bounded whatever the gateway does: a cap per node (least recently used
goes first) and a time to live, on a fake clock. A request whose cache went gets a
retriable error naming why, and the gateway's replay finishes it with the same tokens.
A peer that opens caches and never releases them holds at most the cap, and not for
longer than the TTL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from butterfly.dataplane.stage_server import StageServer
from butterfly.net.framing import Envelope
from butterfly.runtime.torch_thread import TorchThread
from butterfly.runtime.wire import encode_tensor
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.data import StageStep, StepError, StepResult

PROMPT = [5, 9, 2, 7, 1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _step(rid: str, start: int, tokens: list[int]) -> Envelope:
    msg = StageStep((RequestId(rid),), (1,), (start,), (len(tokens),), (), 0, True)
    payload = encode_tensor(torch.tensor([tokens], dtype=torch.int64))
    return Envelope(msg, NodeId(0), 1, "c", 0, False, payload)


async def _server(model: Path, clock: Clock, *, cap: int, ttl: float) -> StageServer:
    server = StageServer(
        node=NodeId(1),
        model_dir=model,
        max_tensor_bytes=1 << 30,
        torch_thread=TorchThread(),
        max_caches=cap,
        cache_ttl_s=ttl,
        clock=clock,
    )
    ack = await server.apply_plan(StagePlan(1, ((NodeId(1), LayerRange(0, 4)),)).to_message("h"))
    assert ack.ok, ack.error
    return server


def test_a_peer_opening_caches_it_never_releases_holds_at_most_the_cap(tiny_model: Path) -> None:
    async def scenario() -> None:
        clock = Clock()
        server = await _server(tiny_model, clock, cap=3, ttl=60)
        for i in range(10):
            clock.now += 1
            out = await server.on_step(_step(f"leak{i}", 0, PROMPT))
            assert isinstance(out.msg, StepResult)
            assert len(server.caches) <= 3
        assert set(server.caches) == {"leak7", "leak8", "leak9"}  # the least recent went
        # an evicted request's next step: a retriable error that says why
        out = await server.on_step(_step("leak0", len(PROMPT), [3]))
        assert isinstance(out.msg, StepError) and out.msg.retriable
        assert "evicted" in out.msg.message and "max_kv_caches" in out.msg.message
        # a request this node never saw still cannot continue mid-way
        out = await server.on_step(_step("stranger", 4, [3]))
        assert isinstance(out.msg, StepError) and not out.msg.retriable
        # the replay from position 0 gets a cache again
        out = await server.on_step(_step("leak0", 0, [*PROMPT, 3]))
        assert isinstance(out.msg, StepResult) and "leak0" in server.caches
        server.close()

    asyncio.run(scenario())


def test_idle_caches_expire_and_used_ones_stay(tiny_model: Path) -> None:
    async def scenario() -> None:
        clock = Clock()
        server = await _server(tiny_model, clock, cap=100, ttl=60)
        await server.on_step(_step("idle", 0, PROMPT))
        await server.on_step(_step("busy", 0, PROMPT))
        for pos in range(len(PROMPT), len(PROMPT) + 4):  # 'busy' decodes every 20 s
            clock.now += 20
            out = await server.on_step(_step("busy", pos, [3]))
            assert isinstance(out.msg, StepResult)
        assert server.expire() == 1
        assert set(server.caches) == {"busy"}
        out = await server.on_step(_step("idle", len(PROMPT), [3]))
        assert isinstance(out.msg, StepError) and out.msg.retriable
        assert "kv_cache_ttl_s" in out.msg.message
        server.close()

    asyncio.run(scenario())


def test_the_gateway_replays_a_request_whose_cache_expired(tiny_model: Path) -> None:
    """Mid-generation, the last stage drops the request's cache (its TTL passes on the
    fake clock); the engine gets the retriable error, replays from the token history and
    returns exactly the tokens of an undisturbed run."""

    expired: list[int] = []

    async def generate(expire_at: int | None) -> tuple[int, ...]:
        clock = Clock()
        ranges = (LayerRange(0, 2), LayerRange(2, 4))
        async with LocalPipeline(
            tiny_model, ranges, cache_ttl_s=60, clock=clock, recovery_wait_s=0.05
        ) as pipeline:
            last = pipeline.servers[NodeId(1)]
            seen: list[int] = []

            def on_token(token: int) -> None:
                seen.append(token)
                if len(seen) == expire_at:
                    clock.now += 120
                    expired.append(last.expire())

            task = InferenceTask(RequestId("r"), input_ids=tuple(PROMPT), max_new_tokens=8)
            async with asyncio.timeout(60):
                result = await pipeline.run(task, on_token)
            return result.output_ids

    async def scenario() -> None:
        assert await generate(3) == await generate(None)
        assert expired == [1]  # the cache did go mid-generation

    asyncio.run(scenario())


def test_an_idle_cache_goes_after_its_ttl_on_a_node_no_new_request_reaches(
    tiny_model: Path,
) -> None:
    """The TTL was checked only when a new request came: a node whose one other request
    kept decoding held an abandoned cache for ever (a review). `expire_idle`, one of
    the node's loops, drops it."""

    async def scenario() -> None:
        clock = Clock()
        server = await _server(tiny_model, clock, cap=100, ttl=60)
        await server.on_step(_step("abandoned", 0, PROMPT))  # its gateway vanished
        await server.on_step(_step("busy", 0, PROMPT))
        expiry = asyncio.create_task(server.expire_idle(every_s=0.01))
        try:
            for pos in range(len(PROMPT), len(PROMPT) + 5):  # 100 s of decoding 'busy'
                clock.now += 20
                out = await server.on_step(_step("busy", pos, [3]))
                assert isinstance(out.msg, StepResult)
            for _ in range(100):  # bounded: the loop runs every 10 ms
                if "abandoned" not in server.caches:
                    break
                await asyncio.sleep(0.01)
            assert set(server.caches) == {"busy"}
        finally:
            expiry.cancel()
            server.close()

    asyncio.run(scenario())
