"""The gateway side of the data path: drive one generation through the stage chain.

The gateway keeps the canonical state of a generation (token history and sampling RNG)
and samples every token itself; stage nodes keep only KV caches. A step goes to the first
stage's node (a direct call when that is this node) and its result comes back from the
last stage's node, matched by (request id, step).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol, TypeVar

import torch

from butterfly.dataplane.audit import Auditor, Verdict
from butterfly.dataplane.proving import RECORD_MISMATCH, culprit, decode_proofs, digest
from butterfly.dataplane.replicate import Lane, Replicator
from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.metrics.events import Emit, MessageDropped, PeerError, Verification, discard
from butterfly.net.framing import Envelope
from butterfly.protocol.entitled import Context, entitled
from butterfly.protocol.proof import Tolerance
from butterfly.runtime.sampling import make_generator, sample
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.schedule.engine import ClusterHealth, Retraction, TokenSink
from butterfly.types.errors import (
    ButterflyError,
    ConnectionFailed,
    InvalidInput,
    SendTimeout,
    ServiceUnavailable,
    StageLost,
)
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceResult, InferenceTask, StageRecord
from butterfly.types.wire.agreement import Proof, encode
from butterfly.types.wire.base import Ask
from butterfly.types.wire.data import (
    CacheQuery,
    Release,
    StageStep,
    StepError,
    StepResult,
)
from butterfly.types.wire.frames import Message

log = logging.getLogger(__name__)


Deliver = Callable[[NodeId, Message, bytes], Awaitable[None]]
R = TypeVar("R")


class Asker(Protocol):
    """Ask a node (this one included) and get the reply the request declares."""

    async def __call__(self, node: NodeId, msg: Ask[R], /) -> R: ...


Mode = Literal["audit", "replicate", "none"]  # byzantine.verification


async def _ignore_liars(liars: tuple[NodeId, ...], reason: str) -> None:
    log.error("liars %s found (%s) but nothing evicts them", liars, reason)


@dataclass
class StepFailed(Exception):
    """A step answered with an error, by `sender` (the authenticated peer, which is the
    one to blame: the node the error names is only what the frame claims)."""

    error: StepError
    sender: NodeId


@dataclass
class _Entry:
    request_id: RequestId
    step: int
    start: int
    x: torch.Tensor  # [1, T] token ids or [1, T, D] vectors
    future: asyncio.Future[torch.Tensor]
    route: tuple[NodeId, ...] = ()  # replicate mode's lanes; () is the plan's chain


class PipelineEngine:
    def __init__(
        self,
        *,
        node: NodeId,
        deliver: Deliver,
        ask: Asker | None = None,
        plan: Callable[[], StagePlan | None],
        health: Callable[[], ClusterHealth],
        max_context: int,
        input_kind: str,
        eos_ids: frozenset[int],
        step_timeout_s: float,
        max_tensor_bytes: int,
        recovery_wait_s: float = 10.0,
        max_recoveries: int = 8,
        auditor: Auditor | None = None,
        audit_fraction: float = 1.0,
        on_liars: Callable[[tuple[NodeId, ...], str], Awaitable[None]] | None = None,
        audit_draw: Callable[[], float] = random.random,
        timeouts: StepTimeouts | None = None,
        emit: Emit = discard,
        replicator: Replicator | None = None,
        verification: Mode | None = None,
        keys: Mapping[NodeId, bytes] | None = None,
    ) -> None:
        """`verification` picks which of the parts built checks a request (audit,
        replicate or none); it defaults to the one part given. `retune` changes it, the
        audit fraction and the step timeout for every request that starts afterwards.
        `keys`: the members' public keys; with them, every result of a checked request
        is checked against its signed records before it is used (`_vouched`)."""
        self._keys = keys
        # (request, step) -> (future of the output and records, stages it covers), for
        # the first half of a relayed step (`_relay`)
        self._relaying: dict[
            tuple[str, int], tuple[asyncio.Future[tuple[torch.Tensor, tuple[bytes, ...]]], int]
        ] = {}
        self._sent_digest: dict[tuple[str, int], bytes] = {}  # what stage 0 was sent
        self._checked: set[str] = set()  # requests (and lanes) whose results need records
        self._emit, self._replicator = emit, replicator
        self._auditor = auditor
        self._mode: Mode = verification or (
            "audit" if auditor is not None else "replicate" if replicator is not None else "none"
        )
        if not self.supports(self._mode):  # e.g. audit asked, with one holder per range
            self._mode = "none"
        self._replicating: set[str] = set()  # requests that started in replicate mode
        self._timeouts = timeouts  # counts chain nodes that leave steps unanswered
        self._auditor, self._audit_fraction, self._audit_draw = auditor, audit_fraction, audit_draw
        self._on_liars = on_liars or _ignore_liars
        self._records: dict[str, list[Proof]] = {}
        self.node, self._deliver, self._ask = node, deliver, ask
        self._plan, self._health = plan, health
        self._max_context, self._input_kind, self._eos = max_context, input_kind, eos_ids
        self._timeout, self._max_tensor_bytes = step_timeout_s, max_tensor_bytes
        self._waiting: dict[tuple[str, int], asyncio.Future[torch.Tensor]] = {}
        self._sent_in: dict[tuple[str, int], int] = {}  # the epoch a step was sent in
        # the route a step was sent on: only its nodes may answer it (protocol.entitled)
        self._sent_on: dict[tuple[str, int], tuple[NodeId, ...]] = {}
        self._queue: list[_Entry] = []
        self._ready = asyncio.Event()
        self._plan_version = asyncio.Event()
        self._recovery_wait_s = recovery_wait_s
        self._max_recoveries = max_recoveries
        self._finished: list[RequestId] = []  # requests whose caches the next Release frees
        self._releasing: asyncio.Task[None] | None = None

    def retune(
        self,
        *,
        step_timeout_s: float,
        verification: Mode,
        audit_fraction: float,
        tolerance: Tolerance,
    ) -> None:
        """Apply changed settings (network.step_timeout_ms, byzantine.verification,
        audit_fraction, rtol/atol): steps waiting now and every later one use the new
        timeout; the check, its sampling and its tolerance apply from the next request (a
        running one keeps its check, so it is never checked half one way and half the
        other). A mode whose part was not built runs as "none", as it did from the start;
        `supports` lets a config check refuse such a change beforehand."""
        self._timeout, self._audit_fraction = step_timeout_s, audit_fraction
        self._mode = verification if self.supports(verification) else "none"
        if self._auditor is not None:
            self._auditor.retune(tolerance)
        if self._replicator is not None:
            self._replicator.retune(tolerance)

    def supports(self, verification: Mode) -> bool:
        """Whether this engine was built with the part `verification` needs."""
        match verification:
            case "audit":
                return self._auditor is not None
            case "replicate":
                return self._replicator is not None
            case "none":
                return True

    @property
    def verification(self) -> Mode:
        return self._mode

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def input_kind(self) -> str:
        return self._input_kind

    def health(self) -> ClusterHealth:
        return self._health()

    def _epoch(self) -> int:
        plan = self._plan()
        return plan.epoch if plan else 0

    async def on_result(self, peer: NodeId, env: Envelope) -> None:
        """The node's route for StepResult and StepError frames: taken only from a node
        of the route each step it answers was sent on (the result from its last node),
        judged by the authenticated `peer`; anything else is dropped and counted before
        a byte of it (records included) is used."""
        msg = env.msg
        if not isinstance(msg, StepResult | StepError):
            return
        waited = [
            key
            for key in zip(msg.request_ids, msg.steps, strict=False)
            if (key in self._waiting and not self._waiting[key].done())
            or (key in self._relaying and not self._relaying[key][0].done())
        ]
        if not waited:
            return  # late or duplicate answers for steps nobody waits for any more
        for key in waited:
            ctx = Context(self.node, self.node, self._plan(), self._sent_on.get(key, ()))
            if not entitled(msg, peer, ctx):
                self._emit(MessageDropped(reason=f"not_entitled_{msg.kind}"))
                log.warning(
                    "dropped %s from node %s: step %s was not sent to it", msg.kind, peer, key
                )
                return
        out = None
        # a batch's records, decoded once (not per request), each to its own request
        proofs = list(decode_proofs(msg.proofs)) if isinstance(msg, StepResult) else []
        for proof in proofs if any(r in self._records for r in msg.request_ids) else ():
            records = self._records.get(proof.request_id)
            if records is not None:
                records.append(proof)
        if isinstance(msg, StepResult):
            try:
                out = decode_tensor(env.payload, self._max_tensor_bytes)
            except ButterflyError as e:
                msg = StepError(msg.request_ids, msg.steps, msg.node, e.kind, str(e), True)
        relayed = self._relaying.get((msg.request_ids[0], msg.steps[0])) if msg.steps else None
        if relayed is not None and len(msg.request_ids) == 1:
            await self._relayed(peer, msg, proofs, out, *relayed)
            return
        liars: dict[NodeId, str] = {}
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
                fut.set_exception(StepFailed(error, peer))
            elif isinstance(msg, StepResult):
                row = out[:, i : i + 1]
                plan = self._plan()
                stages = len(plan.stages) if plan is not None else 0
                try:
                    liar = self._vouched(peer, msg, proofs, i, row, stages)
                except StageLost as e:
                    fut.set_exception(e)
                    continue
                if liar is None:
                    fut.set_result(row)
                else:
                    liars[liar] = f"step {key[1]} of {key[0]}"
                    fut.set_exception(StageLost(f"node {liar} lied about step {key[1]}"))
        for liar, what in liars.items():
            await self._on_liars((liar,), f"signed records contradict {what} (the gateway's check)")

    async def _relayed(
        self,
        peer: NodeId,
        msg: StepResult | StepError,
        proofs: list[Proof],
        out: torch.Tensor | None,
        first: asyncio.Future[tuple[torch.Tensor, tuple[bytes, ...]]],
        upto: int,
    ) -> None:
        """The answer to the first half of a relayed step (`_relay`)."""
        if first.done():
            return
        if isinstance(msg, StepError):
            first.set_exception(StepFailed(msg, peer))
            return
        if out is None:
            return
        try:
            liar = self._vouched(peer, msg, proofs, 0, out, upto)
        except StageLost as e:
            first.set_exception(e)
            return
        if liar is None:
            first.set_result((out, msg.proofs))
            return
        first.set_exception(StageLost(f"node {liar} lied about its output"))
        what = f"step {msg.steps[0]} of {msg.request_ids[0]}"
        await self._on_liars((liar,), f"signed records contradict {what} (the gateway's relay)")

    def _vouched(
        self,
        peer: NodeId,
        msg: StepResult,
        proofs: list[Proof],
        i: int,
        received: torch.Tensor,
        upto: int,
    ) -> NodeId | None:
        """Who lied, if the signed records of entry `i` (`proofs`: the message's, decoded)
        do not vouch for the bytes the gateway received (`proving.culprit`), else None;
        `StageLost` when the plan the step was sent on is gone (nothing to check against,
        nor to use). Requests that are not verified (no records are signed) pass."""
        rid, step = msg.request_ids[i], msg.steps[i]
        key = (rid, step)
        plan = self._plan()
        epoch = self._sent_in.get(key)
        if self._keys is None or rid not in self._checked or epoch is None:
            return None
        if plan is None or plan.epoch != epoch:  # no plan to check against: not used
            raise StageLost(f"the plan moved on while step {step} of {rid} ran")
        found = culprit(
            proofs,
            keys=self._keys,
            request_id=rid,
            step=step,
            upto=upto,
            received=received,
            signers=lambda j: plan.holders(plan.stages[j][1]),
            epoch=epoch,
            peer=peer,
            sent=self._sent_digest.get(key),
        )
        if found is None:
            return None
        liar, why = found
        log.error("step %s of %s: node %s lied: %s", step, rid, liar, why)
        return liar

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
                groups.setdefault((e.route, e.x.dtype, tuple(e.x.shape[2:])), []).append(e)
            for entries in groups.values():
                await self._send_batch(plan, entries)

    async def _send_batch(self, plan: StagePlan, entries: list[_Entry]) -> None:
        nodes = entries[0].route or plan.nodes
        for e in entries:
            self._sent_in[(e.request_id, e.step)] = plan.epoch
            self._sent_on[(e.request_id, e.step)] = tuple(nodes)
            if self._keys is not None and e.request_id in self._checked:
                self._sent_digest[(e.request_id, e.step)] = digest(e.x)
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
        self, request_id: RequestId, step: int, start_pos: int, x: torch.Tensor, route: Lane = ()
    ) -> torch.Tensor:
        key = (request_id, step)
        fut: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        self._queue.append(_Entry(request_id, step, start_pos, x, fut, route))
        self._ready.set()
        refused_by: NodeId | None = None
        nodes = self._route_of(route)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation (a
            # DELETE /tasks) that lands as the step's answer arrives, and the task runs on
            async with asyncio.timeout(self._timeout):
                return await fut
        except TimeoutError as e:
            raise SendTimeout(
                f"step {step} of {request_id} got no answer within {self._timeout:.1f} s"
            ) from e
        except StepFailed as e:
            err = e.error
            if err.error_type == RECORD_MISMATCH and e.sender in nodes[1:]:
                refused_by = e.sender  # settled below, once this attempt's bookkeeping is gone
            else:
                cls = ConnectionFailed if err.retriable else InvalidInput
                raise cls(
                    f"node {e.sender} failed step {step}: {err.message}", blame=e.sender
                ) from None
        finally:
            self._waiting.pop(key, None)
            self._sent_in.pop(key, None)
            self._sent_digest.pop(key, None)
        assert refused_by is not None  # every other way out of the try returns or raises
        return await self._relay(request_id, step, start_pos, x, nodes, nodes.index(refused_by))

    def _route_of(self, route: Lane) -> tuple[NodeId, ...]:
        plan = self._plan()
        return route or (plan.nodes if plan is not None else ())

    async def _relay(
        self,
        request_id: RequestId,
        step: int,
        start: int,
        x: torch.Tensor,
        nodes: tuple[NodeId, ...],
        split: int,
    ) -> torch.Tensor:
        """Re-run a step whose input node `nodes[split]` refused (`RecordMismatch`) with
        the gateway between it and its sender, so the gateway sees the bytes itself.

        The sender's half answers the gateway, which checks the bytes against its signed
        records (a lie convicts the sender: `on_result`); the gateway then forwards those
        very bytes and records to the receiver. A receiver that refuses them again lies,
        and is convicted. Either way the lie costs its teller, never the honest side."""
        plan = self._plan()
        if plan is None:
            raise StageLost("the stage plan is gone")
        key = (request_id, step)
        loop = asyncio.get_running_loop()
        first: asyncio.Future[tuple[torch.Tensor, tuple[bytes, ...]]] = loop.create_future()
        self._relaying[key] = (first, split)
        self._sent_in[key] = plan.epoch
        self._sent_on[key] = nodes[:split]  # the sender's half answers (entitlement)
        self._sent_digest[key] = digest(x)
        length = x.shape[1]
        try:
            head = StageStep(
                (request_id,), (step,), (start,), (length,), nodes[1:split], self.node, True
            )
            await self._deliver(nodes[0], head, encode_tensor(x))
            async with asyncio.timeout(self._timeout):
                out, proofs = await first
        except TimeoutError as e:
            raise SendTimeout(f"relayed step {step} of {request_id}: no answer") from e
        except StepFailed as e:  # an earlier node refused its input: relay there instead
            if e.error.error_type == RECORD_MISMATCH and e.sender in nodes[1:split]:
                earlier = nodes.index(e.sender)
            else:
                cls = ConnectionFailed if e.error.retriable else InvalidInput
                raise cls(
                    f"node {e.sender} failed step {step}: {e.error.message}", blame=e.sender
                ) from None
        else:
            earlier = 0
        finally:
            self._relaying.pop(key, None)
            self._sent_in.pop(key, None)
            self._sent_on.pop(key, None)
            self._sent_digest.pop(key, None)
        if earlier:
            return await self._relay(request_id, step, start, x, nodes, earlier)
        self._sent_in[key] = plan.epoch
        self._sent_on[key] = nodes[split:]  # the receiver's half answers
        self._sent_digest[key] = digest(x)
        receiver = nodes[split]
        second: asyncio.Future[torch.Tensor] = loop.create_future()
        self._waiting[key] = second
        try:
            tail = StageStep(
                (request_id,),
                (step,),
                (start,),
                (length,),
                nodes[split + 1 :],
                self.node,
                True,
                proofs,
            )
            await self._deliver(receiver, tail, encode_tensor(out))
            async with asyncio.timeout(self._timeout):
                return await second
        except TimeoutError as e:
            raise SendTimeout(f"relayed step {step} of {request_id}: no answer") from e
        except StepFailed as e:
            if e.error.error_type == RECORD_MISMATCH and e.sender == receiver:
                reason = (
                    f"refused bytes the gateway checked against their records: {e.error.message}"
                )
                await self._on_liars((receiver,), reason)
                raise StageLost(f"node {receiver} {reason}") from None
            cls = ConnectionFailed if e.error.retriable else InvalidInput
            raise cls(
                f"node {e.sender} failed step {step}: {e.error.message}", blame=e.sender
            ) from None
        finally:
            self._waiting.pop(key, None)
            self._sent_in.pop(key, None)
            self._sent_on.pop(key, None)
            self._sent_digest.pop(key, None)

    def _report(self, e: ButterflyError, what: str) -> None:
        """Count an error against the peer it blames, so `butterfly_peer_errors_total`
        names the node that keeps failing its work (a liar is evicted on evidence, a
        silent node by `StepTimeouts`; this is the operator's view of everything else)."""
        if e.blame is None:
            return
        self._emit(PeerError(node=e.blame, error=e.kind, retriable=e.retriable))
        log.warning(
            "%s failed on node %s (%s, %s): %s",
            what,
            e.blame,
            e.kind,
            "retrying" if e.retriable else "not retriable",
            e,
        )

    def _chain(self, epoch: int) -> tuple[NodeId, ...]:
        """The chain's nodes if the plan is still that of `epoch`, else none."""
        plan = self._plan()
        return plan.nodes if plan is not None and plan.epoch == epoch else ()

    async def _compute(
        self, request_id: RequestId, step: int, pos: int, x: torch.Tensor
    ) -> torch.Tensor:
        """One step: down the chain, or in replicate mode down f+1 lanes that must agree."""
        if self._replicator is None or request_id not in self._replicating:
            return await self._step(request_id, step, pos, x)
        return await self._replicator.step(self, request_id, step, pos, x)

    async def lane_step(
        self, wire_id: RequestId, step: int, start: int, x: torch.Tensor, route: Lane
    ) -> tuple[torch.Tensor, list[Proof]]:
        """A step of one replicate lane (its own request id on the wire) and its records."""
        records = self._records.setdefault(wire_id, [])
        self._checked.add(wire_id)
        out = await self._step(wire_id, step, start, x, route)
        mine = [p for p in records if p.step == step]
        records[:] = [p for p in records if p.step > step]
        return out, mine

    async def release_lane(self, wire_id: RequestId, nodes: Iterable[NodeId]) -> None:
        self._records.pop(wire_id, None)
        self._checked.discard(wire_id)
        for node in nodes:
            try:
                await self._deliver(node, Release((wire_id,)), b"")
            except ButterflyError as e:
                log.debug("release of %s on node %s failed: %s", wire_id, node, e)

    def plan_changed(self) -> None:
        """Fail every step sent on an older plan: its chain may include a node that is
        gone. Each request then resumes on the new plan (see `_generate`); steps already
        sent on the new plan go on."""
        epoch = self._epoch()
        for key, fut in self._waiting.items():
            if not fut.done() and self._sent_in.get(key, epoch) < epoch:
                fut.set_exception(StageLost("the stage plan changed while the step ran"))
        self._plan_version.set()

    async def _await_plan_change(self, epoch: int) -> None:
        """After a failed step: until the plan moves past `epoch`, or a bounded wait (a
        transient error is then retried on the same plan)."""
        deadline = time.monotonic() + self._recovery_wait_s
        while time.monotonic() < deadline:
            plan = self._plan()
            if plan is not None and plan.epoch > epoch:
                return
            self._plan_version.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self._plan_version.wait()

    async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        plan = self._plan()
        if plan is None:
            raise ServiceUnavailable("the cluster has no stage plan yet; retry shortly")
        request_id = task.task_id
        started = time.perf_counter()
        timings: dict[str, float] = {}
        # the settings at the start hold for the whole request (see `retune`)
        replicator = self._replicator if self._mode == "replicate" else None
        auditor = self._auditor if self._mode == "audit" else None
        fraction = self._audit_fraction
        if replicator is not None or auditor is not None:
            self._checked.add(request_id)  # its nodes sign records (verification is on)
        if replicator is not None:
            self._replicating.add(request_id)
        try:
            if task.input_vector:
                x = torch.tensor([[list(task.input_vector)]], dtype=torch.float32)
                out = await self._compute(request_id, 0, 0, x)
                result = self._result(task, plan, (), tuple(out.flatten().tolist()), timings)
                if replicator is not None:
                    return replace(result, verified=replicator.finish(request_id))
                return result
            for _ in range(self._max_recoveries):
                positions: dict[int, tuple[int, int]] = {}
                self._records[request_id] = []
                result = await self._generate(
                    task, request_id, on_token, started, timings, positions
                )
                if replicator is not None:
                    return replace(result, verified=replicator.finish(request_id))
                if auditor is None or self._audit_draw() >= fraction:
                    return result
                verdict = await self._audit(auditor, task, request_id, result, positions)
                if verdict.verified:
                    return replace(result, verified="audit")
                if not verdict.liars:
                    log.warning("request %s unverified: %s", request_id, verdict.reason)
                    return result
                liars = ", ".join(str(n) for n in verdict.liars)
                on_token(Retraction(f"the audit caught node(s) {liars} lying; computing again"))
                epoch = self._epoch()  # the chain lied: its node is being evicted; re-run
                await self._await_plan_change(epoch)
                await self._release(request_id)
            raise ServiceUnavailable(f"request {request_id} failed its audit repeatedly")
        finally:
            self._records.pop(request_id, None)
            self._checked.discard(request_id)
            await asyncio.shield(self._release_finished(request_id))
            if replicator is not None:
                self._replicating.discard(request_id)
                await replicator.release(self, request_id)

    async def _audit(
        self,
        auditor: Auditor,
        task: InferenceTask,
        request_id: RequestId,
        result: InferenceResult,
        positions: dict[int, tuple[int, int]],
    ) -> Verdict:
        plan = self._plan()
        if plan is None:
            return Verdict(False, reason="no plan to audit against")
        claims = auditor.claims_of(
            self._records.get(request_id, []),
            request_id=request_id,
            plan=plan,
            positions=positions,
        )
        gap = auditor.gaps(claims, positions, len(plan.stages))
        if gap:
            self._emit(Verification(check="audit", outcome="unverified"))
            return Verdict(False, reason=gap)
        sequence = list(task.input_ids) + list(result.output_ids[:-1])
        try:
            verdict = await auditor.audit(plan, request_id, sequence, claims)
        except ButterflyError as e:
            return Verdict(False, reason=f"audit could not run: {e}")
        if verdict.liars:
            await self._on_liars(verdict.liars, verdict.reason)
        outcome: Literal["verified", "unverified", "liar_found"] = (
            "liar_found" if verdict.liars else "verified" if verdict.verified else "unverified"
        )
        self._emit(Verification(check="audit", outcome=outcome))
        return verdict

    async def _generate(
        self,
        task: InferenceTask,
        request_id: RequestId,
        on_token: TokenSink,
        started: float,
        timings: dict[str, float],
        positions: dict[int, tuple[int, int]],
    ) -> InferenceResult:
        """Token by token; the gateway's history and RNG are the canonical checkpoint.

        When a step is lost (a node died, the plan changed), the request waits for the new
        plan and replays its whole history (prompt + tokens so far) as one prefill from
        position 0: every stage cuts its cache back to 0 and recomputes, so the next token
        is exactly the one the request would have produced. The RNG is only advanced by
        tokens actually sampled, so sampled requests continue identically too.
        """
        rng = make_generator(task.sampling)
        prompt = list(task.input_ids)
        x = torch.tensor([prompt], dtype=torch.int64)
        out: list[int] = []
        pos, step, recoveries = 0, 0, 0
        while len(out) < task.max_new_tokens:
            epoch = self._epoch()
            step += 1  # step ids are never reused, so a late answer is ignored
            try:
                logits = await self._compute(request_id, step, pos, x)
                positions[step] = (pos, x.shape[1])  # a step whose output was used
                if self._timeouts is not None:
                    self._timeouts.answered(self._chain(epoch))
            except ButterflyError as e:
                self._report(e, f"step {step} of {request_id}")
                if not e.retriable:  # the error tree decides: no list of classes here
                    raise
                if isinstance(e, SendTimeout) and self._timeouts is not None:
                    what = f"step {step} of {request_id}"
                    if e.blame is not None:
                        await self._timeouts.timed_out(e.blame, what)
                    else:  # a chain's step: only a one-node chain says who held it back
                        await self._timeouts.chain_timed_out(self._chain(epoch), what)
                recoveries += 1
                if recoveries > self._max_recoveries:
                    raise
                lost_at = time.perf_counter()
                log.warning(
                    "request %s lost a step at token %d (%s); replaying", request_id, len(out), e
                )
                await self._await_plan_change(epoch)
                history = prompt + out
                pos = await self._resume_at(request_id, len(history))
                for superseded in [s for s, (start, _) in positions.items() if start >= pos]:
                    del positions[superseded]  # the replay recomputes every row they gave
                x = torch.tensor([history[pos:]], dtype=torch.int64)
                timings["resumed_at"] = float(pos)
                timings["recovery_s"] = timings.get("recovery_s", 0.0) + (
                    time.perf_counter() - lost_at
                )
                continue
            token = sample(logits[0, -1], task.sampling, rng)
            if not out:
                timings["time_to_first_token_s"] = time.perf_counter() - started
            out.append(token)
            on_token(token)
            if token in self._eos:
                break
            pos += x.shape[1]
            x = torch.tensor([[token]], dtype=torch.int64)
        total = time.perf_counter() - started
        timings["total_s"] = total
        if recoveries:
            timings["recoveries"] = float(recoveries)
        if len(out) > 1:
            timings["time_per_output_token_s"] = (total - timings["time_to_first_token_s"]) / (
                len(out) - 1
            )
        plan = self._plan()
        return self._result(task, plan, tuple(out), (), timings)

    def _result(
        self,
        task: InferenceTask,
        plan: StagePlan | None,
        ids: tuple[int, ...],
        vector: tuple[float, ...],
        timings: dict[str, float],
    ) -> InferenceResult:
        return InferenceResult(
            task_id=task.task_id,
            output_ids=ids,
            output_vector=vector,
            verified="none",
            stages=tuple(StageRecord(n, r) for n, r in plan.stages) if plan else (),
            timings=timings,
            proofs=tuple(encode(p) for p in self._records.get(str(task.task_id), ())),
        )

    async def _resume_at(self, request_id: RequestId, length: int) -> int:
        """Where a request resumes on a new plan: the fewest positions any stage still
        caches (survivors keep theirs; a promoted standby has the last copy the failed
        node sent it), and never past the last token, whose output is what is missing."""
        plan = self._plan()
        if plan is None or self._ask is None or request_id in self._replicating:
            return 0
        ask = self._ask

        async def held(node: NodeId) -> int:
            try:
                reply = await ask(node, CacheQuery((request_id,)))
            except ButterflyError:
                return 0
            ok = reply.request_ids == (request_id,) and len(reply.lengths) == 1
            return reply.lengths[0] if ok else 0

        lengths = await asyncio.gather(*(held(n) for n in plan.nodes))
        return max(0, min(*lengths, length - 1))

    async def _release(self, *request_ids: RequestId) -> None:
        """Free the requests' KV caches (and standbys' copies) on every node, best effort."""
        plan = self._plan()
        for node in dict.fromkeys((*plan.nodes, *(n for n, _ in plan.replicas))) if plan else ():
            try:
                await self._deliver(node, Release(request_ids), b"")
            except ButterflyError as e:
                log.debug("release of %s on node %s failed: %s", request_ids, node, e)

    def _release_finished(self, request_id: RequestId) -> asyncio.Task[None]:
        """Release a finished (or cancelled) request together with every other request
        that finishes in this turn of the event loop: one frame per node per batch instead
        of one per request (3 of the ~4 frames the gateway sent per short request). The
        send runs in its own task, so a caller cancelled while awaiting it still frees."""
        self._finished.append(request_id)
        if self._releasing is None:
            self._releasing = asyncio.get_running_loop().create_task(self._release_batch())
        return self._releasing

    async def _release_batch(self) -> None:
        await asyncio.sleep(0)  # the other requests finishing in this turn join the frame
        ids, self._finished, self._releasing = tuple(dict.fromkeys(self._finished)), [], None
        await self._release(*ids)
