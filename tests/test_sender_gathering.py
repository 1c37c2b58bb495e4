"""The gateway's sender waits one turn of the loop before it takes its queue
(dataplane.sending.StepSender.serve_batches): requests answered by one delivery queue
their next steps a turn or so apart (a stream's answer passes its token on before it
asks again), and they must still go down together, so that a prompt's next chunk
shares the stage's read of the weights with the decode step beside it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from butterfly.dataplane.inflight import InFlight
from butterfly.dataplane.sending import StepSender
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.data import StageStep
from butterfly.types.wire.frames import Message

pytestmark = pytest.mark.timeout(60)

PLAN = StagePlan(Epoch(1), ((NodeId(1), LayerRange(0, 2)), (NodeId(2), LayerRange(2, 4))), ())


async def test_steps_queued_a_turn_apart_after_one_delivery_go_down_together() -> None:
    sent: list[StageStep] = []
    flight = InFlight()

    async def deliver(node: NodeId, msg: Message, payload: bytes) -> None:
        assert isinstance(msg, StageStep)
        sent.append(msg)
        if len(sent) == 1:  # the first batch's answers arrive in one delivery
            for rid, step in zip(msg.request_ids, msg.steps, strict=True):
                flight.waiting[(rid, step)].set_result(torch.zeros(1, 1, 8))

    sender = StepSender(
        node=NodeId(0), deliver=deliver, plan=lambda: PLAN, flight=flight, keys=None,
        timeout=5.0, on_liars=lambda liars, why: None,
    )  # fmt: skip

    async def prompt() -> None:  # two chunks: the second asked for at once
        await sender.step(RequestId("prompt"), 1, 0, torch.zeros(1, 32, dtype=torch.int64))
        await sender.step(RequestId("prompt"), 2, 32, torch.zeros(1, 32, dtype=torch.int64))

    async def stream() -> None:  # decoding: its token handed on before the next step
        await sender.step(RequestId("stream"), 7, 40, torch.zeros(1, 1, dtype=torch.int64))
        await asyncio.sleep(0)
        await sender.step(RequestId("stream"), 8, 41, torch.zeros(1, 1, dtype=torch.int64))

    loop = asyncio.create_task(sender.serve_batches())
    requests = [asyncio.create_task(prompt()), asyncio.create_task(stream())]
    for _ in range(200):  # both second steps sent (nobody answers them)
        if len(sent) >= 2 and sum(len(m.request_ids) for m in sent) >= 4:
            break
        await asyncio.sleep(0.005)
    loop.cancel()
    for r in requests:
        r.cancel()
    await asyncio.gather(loop, *requests, return_exceptions=True)
    assert [sorted(m.request_ids) for m in sent] == [["prompt", "stream"]] * 2
    assert sorted(sent[1].steps) == [2, 8]
