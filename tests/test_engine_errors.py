"""The gateway's pipeline engine decides retries by the error tree: a step that fails with
a retriable error is replayed, one that fails with a non-retriable error fails the request
at once, and either is counted against the peer the error blames (the authenticated
sender of the failure, not the node the frame names)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from butterfly.dataplane.engine import PipelineEngine
from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.metrics.events import MetricsEvent, PeerError
from butterfly.net.framing import Envelope
from butterfly.runtime.wire import encode_tensor
from butterfly.schedule.engine import ClusterHealth
from butterfly.types.errors import InvalidInput
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.messages import Message, StageStep, StepError, StepResult
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask

GATEWAY, STAGE = NodeId(0), NodeId(1)
PLAN = StagePlan(1, ((STAGE, LayerRange(0, 2)),), ())
VOCAB = 8

# what the stage node answers to each step, in order: "ok", "silent" (no answer), or
# (retriable, the node the error frame claims to come from)
Answer = str | tuple[bool, int]


def chain(
    answers: list[Answer],
    events: list[MetricsEvent],
    timeouts: StepTimeouts | None = None,
    *,
    step_timeout_s: float = 30.0,
) -> tuple[PipelineEngine, list[StageStep]]:
    sent: list[StageStep] = []
    holder: list[PipelineEngine] = []

    async def deliver(peer: NodeId, msg: Message, payload: bytes) -> None:
        if not isinstance(msg, StageStep):
            return
        sent.append(msg)
        answer = answers.pop(0) if answers else "ok"
        engine = holder[0]
        if answer == "silent":
            return
        if answer == "ok":
            logits = torch.zeros(1, sum(msg.lengths), VOCAB)
            logits[..., 3] = 1.0  # greedy picks token 3
            env = Envelope(StepResult(msg.request_ids, msg.steps, int(peer)), int(peer), 1, "c")
            env = Envelope(env.msg, env.sender, 1, "c", 0, False, encode_tensor(logits))
        else:
            retriable, claimed = answer  # type: ignore[misc]
            error = StepError(msg.request_ids, msg.steps, claimed, "x", "broken", retriable)
            env = Envelope(error, int(peer), 1, "c")
        asyncio.get_running_loop().call_soon(engine.on_result, env)

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
        step_timeout_s=step_timeout_s,
        max_tensor_bytes=1 << 20,
        recovery_wait_s=0.0,
        timeouts=timeouts,
        emit=events.append,
    )
    holder.append(engine)
    return engine, sent


async def generate(engine: PipelineEngine, tokens: int = 2) -> list[int]:
    task = InferenceTask(RequestId("r1"), input_ids=(1, 2), max_new_tokens=tokens)
    runner = asyncio.create_task(engine.serve_batches())
    try:
        async with asyncio.timeout(30):
            result = await engine.run(task, lambda token: None)
        return list(result.output_ids)
    finally:
        runner.cancel()


async def test_a_retriable_step_error_is_replayed_and_blamed_on_the_sender() -> None:
    events: list[MetricsEvent] = []
    engine, sent = chain([(True, 7)], events)
    assert await generate(engine) == [3, 3]
    assert len(sent) == 3  # the failed step, its replay, the second token
    assert sent[1].starts == (0,) and sent[1].lengths == (2,)  # replayed from position 0
    # the frame claimed node 7; the peer that sent it is node 1, and it is the one counted
    assert events.count(PeerError(node=STAGE, error="connection_failed", retriable=True)) == 1


async def test_a_non_retriable_step_error_fails_the_request_at_once() -> None:
    events: list[MetricsEvent] = []
    engine, sent = chain([(False, 1)], events)
    with pytest.raises(InvalidInput) as e:
        await generate(engine)
    assert e.value.blame == STAGE and not e.value.retriable
    assert len(sent) == 1  # never retried
    assert PeerError(node=STAGE, error="invalid_input", retriable=False) in events


async def test_a_timed_out_step_is_replayed_and_counted_against_the_silent_node() -> None:
    declared: list[tuple[NodeId, ...]] = []

    async def declare(nodes: tuple[NodeId, ...], reason: str) -> None:
        declared.append(nodes)

    rule = StepTimeouts(
        gateway=GATEWAY, limit=lambda: 1, status=lambda n: "healthy", declare=declare
    )
    events: list[MetricsEvent] = []
    engine, sent = chain(["silent"], events, rule, step_timeout_s=0.2)
    assert await generate(engine, tokens=1) == [3]
    assert len(sent) == 2 and declared == [(STAGE,)]
