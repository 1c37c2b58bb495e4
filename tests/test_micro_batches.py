"""Concurrent requests go down the chain as micro-batches, one per stage at most, so the
stages work at once instead of passing one batch of everyone around the ring."""

from __future__ import annotations

import asyncio

import torch

from butterfly.dataplane.engine import PipelineEngine
from butterfly.dataplane.sending import micro_batches
from butterfly.net.framing import Envelope
from butterfly.runtime.wire import encode_tensor
from butterfly.schedule.engine import ClusterHealth
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.data import StageStep, StepResult
from butterfly.types.wire.frames import Message

GATEWAY = NodeId(0)
NODES = (NodeId(1), NodeId(2), NodeId(3), NodeId(4))
PLAN = StagePlan(1, tuple((n, LayerRange(i, i + 1)) for i, n in enumerate(NODES)), ())
VOCAB = 8


def test_micro_batches_are_even_in_order_and_never_thinner_than_the_minimum() -> None:
    assert micro_batches(16, 4) == [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]
    assert micro_batches(10, 4) == [range(0, 5), range(5, 10)]
    assert micro_batches(7, 4) == [range(0, 7)]
    assert micro_batches(1, 4) == [range(0, 1)]
    assert micro_batches(16, 1) == [range(0, 16)]
    for count in range(1, 40):
        for stages in range(1, 6):
            parts = micro_batches(count, stages)
            assert [i for p in parts for i in p] == list(range(count))
            assert len(parts) <= stages
            assert len(parts) == 1 or min(len(p) for p in parts) >= 4


async def test_sixteen_requests_go_down_a_four_stage_chain_as_four_micro_batches() -> None:
    sent: list[StageStep] = []
    holder: list[PipelineEngine] = []

    async def deliver(peer: NodeId, msg: Message, payload: bytes) -> None:
        if not isinstance(msg, StageStep):
            return
        sent.append(msg)
        logits = torch.zeros(1, sum(msg.lengths), VOCAB)
        logits[..., 3] = 1.0  # greedy picks token 3
        last = NODES[-1]  # the chain's last node answers the gateway
        env = Envelope(
            StepResult(msg.request_ids, msg.steps, int(last)),
            int(last),
            1,
            "c",
            0,
            False,
            encode_tensor(logits),
        )
        asyncio.get_running_loop().create_task(holder[0].on_result(last, env))

    def health() -> ClusterHealth:
        raise AssertionError("not asked")

    engine = PipelineEngine(
        node=GATEWAY,
        deliver=deliver,
        plan=lambda: PLAN,
        health=health,
        max_context=64,
        input_kind="tokens",
        eos_ids=frozenset(),
        step_timeout_s=30.0,
        max_tensor_bytes=1 << 20,
        recovery_wait_s=0.0,
    )
    holder.append(engine)
    runner = asyncio.create_task(engine.serve_batches())
    try:
        tasks = [
            InferenceTask(RequestId(f"r{i}"), input_ids=(1, 2), max_new_tokens=3) for i in range(16)
        ]
        async with asyncio.timeout(30):
            results = await asyncio.gather(*(engine.run(t, lambda token: None) for t in tasks))
    finally:
        runner.cancel()
    assert all(list(r.output_ids) == [3, 3, 3] for r in results)
    first_round = sent[:4]  # every request queued its first step before any was sent
    assert sorted(len(m.request_ids) for m in first_round) == [4, 4, 4, 4]
    assert len({r for m in first_round for r in m.request_ids}) == 16  # each once
    # the groups stay apart afterwards, and together: four requests answered by one
    # delivery queue their next steps in turn, and those go down as one batch
    assert [len(m.request_ids) for m in sent] == [4] * len(sent)
