"""A chain node's KV copies (`KvAppend`) against a cache its receiver computes with.

A copy is taken only into a cache no step of the receiver has computed on
(`KvTable.own`): the chain node of a range wrote its poisoned rows into its standby's
replicate lane, whose caches both lanes then shared, and the lanes agreed on a wrong
answer marked verified (a review). Real nodes built by `node.build_node` in one process
(butterfly.testing.inprocess), the liar signing exactly what it computes and sends.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from butterfly.dataplane.stage_server import StageServer
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.wire import encode_tensor
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.data import KvAppend, StageStep
from butterfly.types.wire.frames import Message

pytestmark = pytest.mark.timeout(120)
LIAR, OTHER_LANE = NodeId(1), NodeId(3)
PROMPT = "Once upon a time"


class LaneCopyPoisoner(StageServer):
    """Node 1, lane 0's holder of the second range: at its sixth step it scales its own
    cache of the request by -3 and ships the same rows, as a copy, to node 3 under lane
    1's id (`replicate._lane_id`: lane 1's generation follows lane 0's)."""

    deliver = None  # the liar's own router's `deliver`, set by the test
    sent = 0
    flood = 0  # copies of made-up requests first, to evict node 3's own cache of lane 1

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        out = await super().compute(msg, epoch, payload, route)
        rid = msg.request_ids[0]
        cache = self.caches.get(rid)
        if self.deliver is None or cache is None or msg.steps[0] != 6 or "~0." not in rid:
            return out
        base, generation = rid.rsplit("~0.", 1)
        other = RequestId(f"{base}~1.{int(generation) + 1}")
        with torch.inference_mode():
            poison = cache.rows(0, cache.length) * -3.0
            cache.write(0, poison)
        assert self.stage is not None
        layers = self.stage.layers
        for i in range(self.flood):
            made_up: Message = KvAppend(RequestId(f"flood-{i}"), layers.start, layers.end, 0)
            await self.deliver(OTHER_LANE, made_up, encode_tensor(poison))
        copy: Message = KvAppend(other, layers.start, layers.end, 0)
        await self.deliver(OTHER_LANE, copy, encode_tensor(poison))
        self.sent += 1
        return out


@pytest.mark.parametrize("flood", [0, 8])
async def test_a_chain_node_cannot_write_its_copy_into_another_lanes_cache(
    tiny_model: Path, tmp_path: Path, flood: int
) -> None:
    """replicate, n = 4, f = 1: lanes 0 -> 1 and 2 -> 3. Node 3 refuses the copy into
    the cache its lane computes with; the lanes disagree where node 1 computed on its
    poison, node 1 is convicted, and the answer is the unsplit model's. Also after a
    flood of copies of made-up requests (twice resources.max_kv_caches), which evicted
    node 3's own cache and let the poison in (a review): copies evict copies only."""
    ids = tuple(TextCodec.load(tiny_model).encode(PROMPT))
    plain = list(generate([load_stage(tiny_model)], ids, 12))
    settings = {
        "coordination.heartbeat_interval_ms": 10,
        "byzantine.verification": "replicate",
        "resources.max_kv_caches": 4,
    }
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=settings, stage_servers={LIAR: LaneCopyPoisoner}
    ) as c:
        liar = c.nodes[LIAR].stage_server
        assert isinstance(liar, LaneCopyPoisoner)
        liar.deliver = c.nodes[LIAR].router.deliver
        liar.flood = flood
        plan = await c.first_plan()
        assert plan.nodes == (0, 1) and OTHER_LANE in plan.holders(plan.stages[1][1])
        task = InferenceTask(RequestId("r"), input_ids=ids, max_new_tokens=12)
        result = await c.infer(task, beats=3000)
        assert liar.sent == 1  # the poisoned copy went out, under lane 1's id
        assert list(result.output_ids) == plain
        assert result.verified == "replicate"
        for _ in range(50):  # an eviction would be agreed by now
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        assert OTHER_LANE not in c.gateway.plans.evicted
        assert set(c.gateway.plans.evicted) <= {LIAR}
