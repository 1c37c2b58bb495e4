"""The data path's message handlers, as the node's router calls them: `(peer, envelope)`.

A stage step is computed and its output sent straight on to the next node of its route
(this node included, through the same `deliver`), then the step's additions to the KV
caches go to the range's standbys, off the step's path. When the next node cannot be
reached, the gateway hears it at once (a `next_unreachable` error) rather than after its step
timeout.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

from butterfly.dataplane.engine import Deliver
from butterfly.dataplane.inflight import DISPATCH_REFUSED, NEXT_UNREACHABLE
from butterfly.dataplane.stage_server import StageServer
from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.metrics.events import (
    CheckpointCopied,
    Emit,
    HopTimed,
    MessageDropped,
    StageStepTimed,
)
from butterfly.metrics.logcontext import REQUEST_ID
from butterfly.metrics.tracing import Tracing, now_ns
from butterfly.net.conn import Reply
from butterfly.net.framing import Envelope
from butterfly.net.transport import Transport, unless_failed
from butterfly.protocol.dispatch import Refusal
from butterfly.protocol.entitled import Context, entitled
from butterfly.types.errors import ButterflyError, InvalidMessage, SendTimeout
from butterfly.types.ids import GATEWAY, NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.base import Ask
from butterfly.types.wire.data import (
    AuditReply,
    AuditRequest,
    CacheQuery,
    InputsHeld,
    InputsQuery,
    KvAppend,
    Release,
    StageStep,
    StepError,
)

log = logging.getLogger(__name__)
A = TypeVar("A")  # the reply a request declares

EARLY_STEP_BYTES = 64 << 20
"""Payload bytes of steps each peer may have waiting for a plan this node has not
reached (beyond one step, which may always wait). The epoch a step waits for is the
unsigned envelope's, and a waiting step cannot be judged yet (the plan it waits for may
make its sender the previous stage), so any member could park steps here for
`EARLY_STEP_WAIT_S` each: 48 steps of 16 MiB held 768 MiB (a review). An honest gateway
is ahead of a node by the few steps it sends while the node applies the plan."""


def early_step_fits(waiting: int, size: int, budget: int = EARLY_STEP_BYTES) -> bool:
    """Whether a step of `size` payload bytes may wait for its plan beside the `waiting`
    bytes of its peer's steps already waiting: one always may (an honest long prompt's
    activations can be larger than the budget), more while they fit the budget."""
    return waiting == 0 or waiting + size <= budget


class StageRoutes:
    """The stage server's handlers: steps, audits, releases, cache copies and queries."""

    def __init__(
        self,
        *,
        node: NodeId,
        server: StageServer,
        deliver: Deliver,
        emit: Emit,
        gateway: Callable[[], NodeId] = lambda: GATEWAY,
        gateways: Callable[[], Collection[NodeId]] = lambda: (GATEWAY,),
        tracing: Tracing | None = None,
    ) -> None:
        """`gateway`: the acting gateway as agreed, read on every step; `gateways`: every
        gateway-capable node. `tracing`: records a span for each traced entry of a step
        (metrics.tracing)."""
        self.node, self._server, self._deliver, self._emit = node, server, deliver, emit
        self._gateway, self._gateways, self._tracing = gateway, gateways, tracing
        self._waiting: dict[NodeId, int] = {}  # payload bytes of steps early, per peer

    async def step(self, peer: NodeId, env: Envelope) -> Reply | None:
        """Run a step from the gateway or the previous stage, judged by the plan of the
        step's epoch (the gateway may have switched to it a step ahead of this node):
        anyone else could otherwise overwrite a request's KV cache here. A step of the
        current epoch (every step but a few at a plan switch) waits for nothing."""
        msg = env.msg
        if not isinstance(msg, StageStep):
            return None
        if env.epoch <= self._server.epoch:
            plan = self._server.plan
        elif self._may_wait(peer, env):
            plan = await self._plan_waited(peer, env)
        else:
            return None
        gateway = self._gateway()
        if not entitled(msg, peer, Context(self.node, gateway, plan)):
            self._emit(MessageDropped(reason="not_entitled_stage_step"))
            log.warning("dropped a stage step from node %s: not the previous stage", peer)
            return None
        route = self._server.admit(msg, peer, gateway, self._gateways(), env.epoch)
        if isinstance(route, Refusal):  # unanswered (its reply_to is unvouched), but
            self._emit(MessageDropped(reason="undispatched_stage_step"))
            log.warning("dropped a stage step from node %s: %s", peer, route.reason)
            if route.answer_to is not None:  # the gateway that signed exactly this step
                again = StepError(
                    msg.request_ids, msg.steps, self.node, DISPATCH_REFUSED, route.reason, True
                )
                with contextlib.suppress(ButterflyError):  # it is gone: nothing to tell
                    await self._deliver(route.answer_to, again, b"")
            return None
        context = REQUEST_ID.set(",".join(msg.request_ids))
        try:
            await self._run_step(msg, env, route)
        finally:
            REQUEST_ID.reset(context)
        return None

    def _may_wait(self, peer: NodeId, env: Envelope) -> bool:
        """Whether a step of a later epoch than this node's may wait for that plan; if
        not, it is dropped and counted (`early_step_fits`)."""
        waiting = self._waiting.get(peer, 0)
        if early_step_fits(waiting, len(env.payload)):
            return True
        self._emit(MessageDropped(reason="early_stage_step_over_budget"))
        log.warning(
            "dropped a stage step of epoch %s from node %s: its steps waiting for that "
            "plan hold %d bytes already",
            env.epoch,
            peer,
            waiting,
        )
        return False

    async def _plan_waited(self, peer: NodeId, env: Envelope) -> StagePlan | None:
        """The plan of the step's epoch once it came (or the plan in force once the wait
        ran out), its payload counted against its peer meanwhile."""
        size = len(env.payload)
        self._waiting[peer] = self._waiting.get(peer, 0) + size
        try:
            return await self._server.plan_of(env.epoch)
        finally:
            left = self._waiting[peer] - size
            if left:
                self._waiting[peer] = left
            else:
                del self._waiting[peer]

    async def _run_step(self, msg: StageStep, env: Envelope, route: tuple[NodeId, ...]) -> None:
        start_ns = now_ns() if msg.trace else 0
        started = time.perf_counter()
        out = await self._server.on_step(env, route)
        computed = time.perf_counter()
        stage = self._server.stage_index()
        log.debug("node %s ran steps %s as stage %s", self.node, msg.steps, stage)
        if stage is not None:
            self._emit(StageStepTimed(stage=stage, seconds=computed - started))
        if msg.trace and self._tracing is not None:
            end_ns = start_ns + int((computed - started) * 1e9)
            _trace(self._tracing, self.node, msg, stage, start_ns, end_ns)
        try:
            await self._deliver(out.peer, out.msg, out.payload)
            if out.peer != self.node:  # to itself, `deliver` runs the next handler inline
                self._emit(HopTimed(peer=out.peer, seconds=time.perf_counter() - computed))
        except ButterflyError as e:  # the next stage is gone: tell the gateway now
            lost = StepError(  # or the output cannot be sent at all (over the message limit)
                msg.request_ids,
                msg.steps,
                self.node,
                NEXT_UNREACHABLE if e.retriable else e.kind,
                f"node {out.peer} unreachable: {e}" if e.retriable else str(e),
                e.retriable,
            )
            await self._deliver(NodeId(msg.reply_to), lost, b"")
            return
        await self._copy_caches(msg.request_ids)

    async def _copy_caches(self, request_ids: tuple[RequestId, ...]) -> None:
        """Send the standbys what the step added to the caches, off the step's path."""
        for copy in self._server.kv_deltas(request_ids):
            self._emit(CheckpointCopied(bytes=len(copy.payload)))
            try:
                await self._deliver(copy.peer, copy.msg, copy.payload)
            except ButterflyError as e:  # a dead standby is the detector's business
                log.debug("KV copy to node %s lost: %s", copy.peer, e)

    async def audit(self, peer: NodeId, env: Envelope) -> Reply | None:
        msg = env.msg
        return await self._server.audit(msg, env.payload) if isinstance(msg, AuditRequest) else None

    async def inputs(self, peer: NodeId, env: Envelope) -> Reply | None:
        msg = env.msg
        return self._server.inputs_held(msg) if isinstance(msg, InputsQuery) else None

    async def release(self, peer: NodeId, env: Envelope) -> Reply | None:
        if isinstance(env.msg, Release):
            for request_id in env.msg.request_ids:
                self._server.release(request_id)
        return None

    async def kv_append(self, peer: NodeId, env: Envelope) -> Reply | None:
        if isinstance(env.msg, KvAppend) and self._server.on_kv_append(env.msg, env.payload):
            self._emit(MessageDropped(reason="kv_copy_refused"))
        return None

    async def cache_query(self, peer: NodeId, env: Envelope) -> Reply | None:
        msg = env.msg
        return (self._server.cache_lengths(msg), b"") if isinstance(msg, CacheQuery) else None


def _trace(
    tracing: Tracing, node: NodeId, msg: StageStep, stage: int | None, start_ns: int, end_ns: int
) -> None:
    """A span per traced entry of the batch, each under its own request's span."""
    entries = zip(msg.request_ids, msg.steps, msg.starts, msg.lengths, msg.trace, strict=False)
    for rid, step, start, length, parent in entries:
        if parent:
            tracing.record_step(
                parent,
                start_ns,
                end_ns,
                {
                    "butterfly.request_id": rid,
                    "butterfly.step": step,
                    "butterfly.position": start,
                    "butterfly.tokens": length,
                    "butterfly.stage": -1 if stage is None else stage,
                    "butterfly.node": int(node),
                    "butterfly.batch": len(msg.request_ids),
                },
            )


class AuditAsk:
    """How the gateway's auditor asks a node to re-run a request's prefill, or for the
    inputs it received: its own stage server directly, a peer over the transport,
    counting a peer's timeouts (a silent auditor is evicted like a silent stage:
    dataplane.unresponsive), and no longer waiting for a peer the failure detector
    declares failed meanwhile (as a step is dropped once the plan moves past its node)."""

    def __init__(
        self,
        *,
        node: NodeId,
        local: Callable[[AuditRequest, bytes], Awaitable[tuple[AuditReply, bytes]]],
        local_inputs: Callable[[InputsQuery], tuple[InputsHeld, bytes]],
        transport: Transport,
        timeouts: StepTimeouts,
        timeout_s: Callable[[], float],
        failed: Callable[[NodeId], bool] = lambda node: False,
    ) -> None:
        """`timeout_s`: read on every audit (network.step_timeout_ms is live). `failed`:
        the failure detector's word on a node; an ask to a node it declares failed ends
        at once, as one that got no answer (nobody is blamed; the gateway's own
        re-execution judges instead): a node frozen (SIGSTOP) or cut off mid-audit keeps
        its connection open, and held the request's answer for the whole step timeout
        (60 s by default) after the detector had declared it failed (a review)."""
        self.node, self._local, self._transport = node, local, transport
        self._local_inputs = local_inputs
        self._timeouts, self._timeout, self._failed = timeouts, timeout_s, failed

    async def __call__(
        self, node: NodeId, request: AuditRequest, payload: bytes
    ) -> tuple[AuditReply, bytes]:
        if node == self.node:
            return await self._local(request, payload)
        return await self._ask(node, request, payload, f"audit of {request.request_id}")

    async def inputs(self, node: NodeId, query: InputsQuery) -> tuple[InputsHeld, bytes]:
        if node == self.node:
            return self._local_inputs(query)
        return await self._ask(node, query, b"", f"inputs of {query.request_id}")

    async def _ask(self, node: NodeId, msg: Ask[A], payload: bytes, what: str) -> tuple[A, bytes]:
        try:
            asking = self._transport.ask(node, msg, payload, timeout=self._timeout())
            answer = await unless_failed(node, asking, self._failed, what)
        except SendTimeout:
            await self._timeouts.timed_out(node, what)
            raise
        except InvalidMessage:  # an answer of the wrong kind: the auditor judges it
            self._timeouts.answered((node,))
            raise
        self._timeouts.answered((node,))
        return answer


__all__ = ["AuditAsk", "StageRoutes"]
