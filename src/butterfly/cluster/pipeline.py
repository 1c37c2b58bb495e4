"""The gateway side of the data path: drive one generation through the stage chain.

The gateway keeps the canonical state of a generation (token history and sampling RNG)
and samples every token itself; stage nodes keep only KV caches. A step goes to the first
stage's node (a direct call when that is this node) and its result comes back from the
last stage's node, matched by (request id, step).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from butterfly.cluster.stage_server import StagePlan
from butterfly.net.framing import Envelope
from butterfly.runtime.sampling import make_generator, sample
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.schedule.engine import ClusterHealth, TokenSink
from butterfly.types.errors import (
    ButterflyError,
    ConnectionFailed,
    InvalidInput,
    SendTimeout,
    ServiceUnavailable,
)
from butterfly.types.ids import NodeId
from butterfly.types.messages import Message, Release, StageStep, StepError, StepResult
from butterfly.types.tasks import InferenceResult, InferenceTask, StageRecord

log = logging.getLogger(__name__)


Deliver = Callable[[NodeId, Message, bytes], Awaitable[None]]


@dataclass
class StepFailed(Exception):
    error: StepError


@dataclass
class _Entry:
    request_id: str
    step: int
    start: int
    x: torch.Tensor  # [1, T] token ids or [1, T, D] vectors
    future: asyncio.Future[torch.Tensor]


class PipelineEngine:
    def __init__(
        self,
        *,
        node: NodeId,
        deliver: Deliver,
        plan: Callable[[], StagePlan | None],
        health: Callable[[], ClusterHealth],
        max_context: int,
        input_kind: str,
        eos_ids: frozenset[int],
        step_timeout_s: float,
        max_tensor_bytes: int,
    ) -> None:
        self.node, self._deliver = node, deliver
        self._plan, self._health = plan, health
        self._max_context, self._input_kind, self._eos = max_context, input_kind, eos_ids
        self._timeout, self._max_tensor_bytes = step_timeout_s, max_tensor_bytes
        self._waiting: dict[tuple[str, int], asyncio.Future[torch.Tensor]] = {}
        self._queue: list[_Entry] = []
        self._ready = asyncio.Event()

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def input_kind(self) -> str:
        return self._input_kind

    def health(self) -> ClusterHealth:
        return self._health()

    def on_result(self, env: Envelope) -> None:
        """Called by the node's dispatcher for StepResult and StepError frames."""
        msg = env.msg
        if not isinstance(msg, StepResult | StepError):
            return
        out = None
        if isinstance(msg, StepResult):
            try:
                out = decode_tensor(env.payload, self._max_tensor_bytes)
            except ButterflyError as e:
                msg = StepError(msg.request_ids, msg.steps, msg.node, e.kind, str(e), True)
        for i, key in enumerate(zip(msg.request_ids, msg.steps, strict=False)):
            fut = self._waiting.get(key)
            if fut is None or fut.done():
                continue  # late or duplicate answer for a step nobody waits for any more
            if out is None or out.shape[1] <= i:
                error = (
                    msg
                    if isinstance(msg, StepError)
                    else StepError(
                        msg.request_ids,
                        msg.steps,
                        msg.node,
                        "invalid_message",
                        f"result holds {0 if out is None else out.shape[1]} rows",
                        False,
                    )
                )
                fut.set_exception(StepFailed(error))
            else:
                fut.set_result(out[:, i : i + 1])

    async def serve_batches(self) -> None:
        """Send queued steps, batched: every step queued since the last send goes in one
        StageStep (per input kind), so concurrent requests share each stage's forward."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._queue = self._queue, []
            plan = self._plan()
            if plan is None:
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(ServiceUnavailable("the stage plan is gone"))
                continue
            groups: dict[tuple[object, ...], list[_Entry]] = {}
            for e in batch:
                groups.setdefault((e.x.dtype, tuple(e.x.shape[2:])), []).append(e)
            for entries in groups.values():
                await self._send_batch(plan, entries)

    async def _send_batch(self, plan: StagePlan, entries: list[_Entry]) -> None:
        nodes = plan.nodes
        msg = StageStep(
            tuple(e.request_id for e in entries),
            tuple(e.step for e in entries),
            tuple(e.start for e in entries),
            tuple(e.x.shape[1] for e in entries),
            nodes[1:],
            self.node,
            True,
        )
        payload = encode_tensor(torch.cat([e.x for e in entries], dim=1))
        try:
            await self._deliver(nodes[0], msg, payload)
        except ButterflyError as e:
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(e)

    async def _step(
        self, request_id: str, step: int, start_pos: int, x: torch.Tensor
    ) -> torch.Tensor:
        key = (request_id, step)
        fut: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        self._queue.append(_Entry(request_id, step, start_pos, x, fut))
        self._ready.set()
        try:
            return await asyncio.wait_for(fut, self._timeout)
        except TimeoutError as e:
            raise SendTimeout(
                f"step {step} of {request_id} got no answer within {self._timeout:.1f} s"
            ) from e
        except StepFailed as e:
            err = e.error
            cls = ConnectionFailed if err.retriable else InvalidInput
            raise cls(
                f"node {err.node} failed step {step}: {err.message}", blame=NodeId(err.node)
            ) from None
        finally:
            self._waiting.pop(key, None)

    async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        plan = self._plan()
        if plan is None:
            raise ServiceUnavailable("the cluster has no stage plan yet; retry shortly")
        request_id = str(task.task_id)
        started = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            if task.input_vector:
                x = torch.tensor([[list(task.input_vector)]], dtype=torch.float32)
                out = await self._step(request_id, 0, 0, x)
                return self._result(task, plan, (), tuple(out.flatten().tolist()), timings)
            return await self._generate(task, plan, request_id, on_token, started, timings)
        finally:
            await self._release(plan, request_id)

    async def _generate(
        self,
        task: InferenceTask,
        plan: StagePlan,
        request_id: str,
        on_token: TokenSink,
        started: float,
        timings: dict[str, float],
    ) -> InferenceResult:
        rng = make_generator(task.sampling)
        history = list(task.input_ids)
        x = torch.tensor([history], dtype=torch.int64)
        pos, out = 0, []
        for step in range(task.max_new_tokens):
            logits = await self._step(request_id, step, pos, x)
            token = sample(logits[0, -1], task.sampling, rng)
            if step == 0:
                timings["time_to_first_token_s"] = time.perf_counter() - started
            out.append(token)
            on_token(token)
            if token in self._eos:
                break
            pos += x.shape[1]
            x = torch.tensor([[token]], dtype=torch.int64)
        total = time.perf_counter() - started
        timings["total_s"] = total
        if len(out) > 1:
            timings["time_per_output_token_s"] = (total - timings["time_to_first_token_s"]) / (
                len(out) - 1
            )
        return self._result(task, plan, tuple(out), (), timings)

    def _result(
        self,
        task: InferenceTask,
        plan: StagePlan,
        ids: tuple[int, ...],
        vector: tuple[float, ...],
        timings: dict[str, float],
    ) -> InferenceResult:
        return InferenceResult(
            task_id=task.task_id,
            output_ids=ids,
            output_vector=vector,
            verified="none",
            stages=tuple(StageRecord(n, r) for n, r in plan.stages),
            timings=timings,
        )

    async def _release(self, plan: StagePlan, request_id: str) -> None:
        """Free the request's KV cache on every node of the plan, best effort."""
        for node in plan.nodes:
            try:
                await self._deliver(node, Release(request_id), b"")
            except ButterflyError as e:
                log.debug("release of %s on node %s failed: %s", request_id, node, e)
