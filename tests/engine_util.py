"""A pipeline engine whose one-stage chain is a function: each step is answered as the
test says ("ok" with logits that make greedy pick token 3, "silent", or an error)."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from butterfly.dataplane.engine import PipelineEngine
from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.metrics.events import MetricsEvent
from butterfly.net.framing import Envelope
from butterfly.runtime.wire import encode_tensor
from butterfly.schedule.engine import ClusterHealth
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceResult, InferenceTask
from butterfly.types.wire.data import StageStep, StepError, StepResult
from butterfly.types.wire.frames import Message

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
    **engine_kw: Any,
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
        asyncio.get_running_loop().create_task(engine.on_result(peer, env))

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
        **engine_kw,
    )
    holder.append(engine)
    return engine, sent


async def run(engine: PipelineEngine, tokens: int = 2, task_id: str = "r1") -> InferenceResult:
    task = InferenceTask(RequestId(task_id), input_ids=(1, 2), max_new_tokens=tokens)
    runner = asyncio.create_task(engine.serve_batches())
    try:
        async with asyncio.timeout(30):
            return await engine.run(task, lambda token: None)
    finally:
        runner.cancel()


async def generate(engine: PipelineEngine, tokens: int = 2) -> list[int]:
    return list((await run(engine, tokens)).output_ids)
