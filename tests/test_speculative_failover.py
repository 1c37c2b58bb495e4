"""Speculative decoding across a gateway failover: the checkpoint (token history and RNG
state) taken after a verify step resumes the request on the successor with exactly the
tokens an uninterrupted run gives, greedy and sampled (butterfly.testing.inprocess).

n = 4, f = 1, gateways (0, 1), verification none (speculation runs for unchecked requests
only), generation checkpoints every 4 tokens. A verify step yields several tokens at
once, so a checkpoint is taken whenever the count passes a multiple of 4."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask, SamplingParams
from butterfly.wiring.gateway import Gateway

pytestmark = pytest.mark.timeout(120)
SETTINGS = {
    "coordination.heartbeat_interval_ms": 10,
    "coordination.checkpoint_frequency": 4,
    "cluster.gateways": [0, 1],
    "byzantine.verification": "none",
    "generation.speculative.mode": "ngram",
    "generation.speculative.k": 4,
}
EDIT = "def add(a, b):\n    return a + b\n\n# again:\ndef add(a, b):\n"
NEW = 40
SAMPLED = SamplingParams(temperature=0.8, seed=11)
GREEDY = SamplingParams()


def task(model: Path, name: str, sampling: SamplingParams) -> InferenceTask:
    ids = tuple(TextCodec.load(model).encode(EDIT))
    return InferenceTask(RequestId(name), input_ids=ids, max_new_tokens=NEW, sampling=sampling)


def gateway(c: InProcessCluster, node: int) -> Gateway:
    gw = c.nodes[node].gateway
    assert gw is not None
    return gw


async def test_a_speculating_request_resumes_on_the_successor_with_its_tokens(
    tiny_model: Path, tmp_path: Path
) -> None:
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        scheduler = first.scheduler
        assert scheduler is not None
        references: dict[str, tuple[int, ...]] = {}
        traversals: dict[str, float] = {}
        for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
            await scheduler.submit(task(tiny_model, f"ref-{name}", sampling))
            done = await scheduler.wait(f"ref-{name}", 60)
            assert done.result is not None
            references[name] = done.result.output_ids
            traversals[name] = done.result.timings["traversals"]
        assert len(references["greedy"]) == NEW and traversals["greedy"] < NEW  # it speculated

        for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
            await scheduler.submit(task(tiny_model, name, sampling))

        async def cut_off_after_a_checkpoint() -> int:
            produced = 0
            async for _ in scheduler.stream("greedy"):
                produced += 1
                if produced >= 5 and standby.replicas.store.checkpoint("greedy") is not None:
                    c.kill(0)
                    return produced
            raise AssertionError("the task finished before node 1 had a checkpoint")

        killed_at = await asyncio.wait_for(cut_off_after_a_checkpoint(), 30)
        assert killed_at < NEW
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over")
        successor = standby.scheduler
        assert successor is not None

        def finished(task_id: str) -> bool:
            stored = standby.replicas.store.get(task_id)
            return stored is not None and stored.state.terminal

        await c.until(lambda: finished("greedy") and finished("sampled"), "tasks", beats=1000)
        for name in ("greedy", "sampled"):
            snap = await successor.wait(name, 10)  # stored terminal; settled here too
            assert snap.result is not None
            assert snap.result.output_ids == references[name], name
        greedy = await successor.snapshot("greedy")
        assert greedy.result is not None
        assert greedy.result.timings["resumed_from_checkpoint"] >= 4  # not from scratch
