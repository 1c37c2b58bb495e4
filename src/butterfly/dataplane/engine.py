"""The gateway side of the data path: drive one generation through the stage chain.

The gateway keeps the canonical state of a generation (token history and sampling RNG)
and samples every token itself; stage nodes keep only KV caches. A step goes to the first
stage's node (a direct call when that is this node) and its result comes back from the
last stage's node, matched by (request id, step). The parts: `sending` (batching steps,
relaying refused ones), `intake` (who may answer, who vouches for the bytes), `inflight`
(the table both share), `caches` (resuming and releasing the nodes' caches); this module
orchestrates one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, Literal

import torch
from tokenizers import Tokenizer

from butterfly.dataplane.audit import Auditor
from butterfly.dataplane.caches import Asker as Asker
from butterfly.dataplane.caches import Caches
from butterfly.dataplane.claims import Claims
from butterfly.dataplane.drafter import Draft, ModelDrafter, draft_seed
from butterfly.dataplane.generation import Generation, fresh_checkpoint
from butterfly.dataplane.inflight import InFlight, Key
from butterfly.dataplane.inflight import StepFailed as StepFailed
from butterfly.dataplane.intake import Intake
from butterfly.dataplane.lanes import Lane
from butterfly.dataplane.proving import Shape, Shapes
from butterfly.dataplane.replicate import Replicator
from butterfly.dataplane.request_audit import Steps, audit_request
from butterfly.dataplane.sending import Deliver as Deliver
from butterfly.dataplane.sending import RecordSize, StepSender
from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.metrics.events import Emit, PeerError, discard
from butterfly.metrics.logcontext import REQUEST_ID
from butterfly.metrics.tracing import Tracing
from butterfly.net.framing import Envelope
from butterfly.protocol.dispatch import Dispatcher
from butterfly.protocol.proof import Tolerance
from butterfly.runtime.sampling import is_greedy
from butterfly.schedule.chunks import ChunkTimes, chunk_length
from butterfly.schedule.drafts import Speculation, draft
from butterfly.schedule.engine import ClusterHealth, Retraction, TokenSink
from butterfly.schedule.store import Checkpoint
from butterfly.types.errors import (
    ButterflyError,
    ContextLengthExceeded,
    InvalidInput,
    SendTimeout,
    ServiceUnavailable,
    StageLost,
)
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceResult, InferenceTask, StageRecord
from butterfly.types.wire.agreement import Proof, encode

log = logging.getLogger(__name__)


Mode = Literal["audit", "replicate", "none"]  # byzantine.verification
PLAIN = Speculation()  # one token per traversal


async def _ignore_liars(liars: tuple[NodeId, ...], reason: str) -> None:
    log.error("liars %s found (%s) but nothing evicts them", liars, reason)


class PipelineEngine:
    def __init__(
        self,
        *,
        node: NodeId,
        deliver: Deliver,
        ask: Asker | None = None,
        plan: Callable[[], StagePlan | None],
        health: Callable[[], ClusterHealth],
        unserved: Callable[[], str | None] = lambda: None,
        max_context: int,
        input_kind: str,
        eos_ids: frozenset[int],
        step_timeout_s: float,
        generates: bool = True,
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
        f: int = 0,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[RequestId, Checkpoint], None] | None = None,
        resume: Callable[[RequestId], Checkpoint | None] | None = None,
        tracing: Tracing | None = None,
        speculation: Speculation = PLAIN,
        prefill_chunk: int = 0,
        tokenizer: Tokenizer | None = None,
        records: RecordSize | None = None,
        drafter: ModelDrafter | None = None,
        dispatcher: Dispatcher | None = None,
        vocab: int = 0,
    ) -> None:
        """`verification` picks which of the parts built checks a request (audit,
        replicate or none); it defaults to the one part given. `retune` changes it, the
        audit fraction and the step timeout for every request that starts afterwards.
        `keys`: the members' public keys; with them, every result of a checked request
        is checked against its signed records before it is used (`intake.Intake`). `f`:
        the liars tolerated; another node's claim that a request cannot be served is
        believed only as `claims.Claims` says (with 0, at once).
        `on_checkpoint` gets each request's generation every `checkpoint_every` tokens
        (the standby gateways keep it: `wiring.standby`); `resume` finds the one a request
        left before the gateway running it died, to go on from there.
        `tracing`: opens a span for each request it samples (metrics.tracing). `vocab`:
        the width of the logits a result must hold (0: not checked; an encoder's).
        `speculation`, `prefill_chunk`: generation.speculative and .prefill_chunk
        (`retune_generation`). `tokenizer`: the model's, to find a task's stop strings
        in its text as it is generated (a task with stops and no tokenizer is refused).
        `generates`: False for an encoder (`runtime.stage.Family.generates`).
        `unserved`: why no plan is in force (`control.recovery.Recovery.unserved`, say a
        checkpoint no node can load), or None: a request then fails at once with it.
        `records`: the size of the signed records the stages add to each step (None:
        they sign none); a step carries no more than fit a frame header. `drafter`: the
        small model that drafts in mode "draft" (`dataplane.drafter`; None: that mode
        decodes plainly here, and config.validate refuses it). `dispatcher`: signs every
        step this gateway sends, where stages run only such steps (protocol.dispatch)."""
        self._tokenizer, self.generates = tokenizer, generates
        self.checkpoint_every, self._on_checkpoint = checkpoint_every, on_checkpoint
        self._resume = resume
        self._flight = InFlight()
        self._tracing = tracing
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
        self.node = node
        self._plan, self._health, self._unserved = plan, health, unserved
        self._max_context, self._input_kind, self._eos = max_context, input_kind, eos_ids
        self._sender = StepSender(
            node=node,
            deliver=deliver,
            plan=plan,
            flight=self._flight,
            keys=keys,
            timeout=step_timeout_s,
            on_liars=self._on_liars,
            emit=emit,
            records=records,
            dispatcher=dispatcher,
        )
        shape = Shape(records.top_k, records.chunk) if records is not None else None
        self._shapes = Shapes(shape, shape) if shape is not None else None
        self._intake = Intake(
            node, plan, self._flight, keys, max_tensor_bytes, emit, self._on_liars, vocab
        )
        self._caches = Caches(deliver=deliver, ask=ask, plan=plan)
        self._claims = Claims(node, f)
        self._plan_version = asyncio.Event()
        self._recovery_wait_s = recovery_wait_s
        self._max_recoveries = max_recoveries
        self.waiting_for_plan = 0
        """Requests that lost a step and wait for a new plan (a stopping gateway's grace
        is over once every running request does: none of them can progress)."""
        self._speculation, self._prefill_chunk = speculation, prefill_chunk
        self._drafter = drafter
        self.chunk_times = ChunkTimes()
        """Step round trips that size a prompt's chunks (`schedule.chunks`)."""

    def retune_generation(self, *, speculation: Speculation, prefill_chunk: int) -> None:
        """Apply generation.speculative and generation.prefill_chunk from the next request
        on (a running one keeps what it started with, as with `retune`)."""
        self._speculation, self._prefill_chunk = speculation, prefill_chunk

    async def _draft(self, task: InferenceTask, gen: Generation, speculation: Speculation) -> Draft:
        """The next traversal's draft: prompt lookup, or the small model's guess (drawn,
        for a sampled request, with a seed from the request's RNG state, which it leaves
        as it is, and only while its record says its drafts are being kept)."""
        tokens, generated, budget = gen.history(), len(gen.out), gen.budget
        if speculation.mode != "draft":
            return Draft(draft(tokens, speculation, budget))
        k = min(speculation.k, budget)
        if self._drafter is None or k <= 0:
            return Draft()
        sampling = task.sampling
        seed = 0
        if not is_greedy(sampling):
            if not gen.acceptance.drafts():
                return Draft()
            seed = draft_seed(bytes(gen.rng.get_state().numpy().tobytes()), len(tokens))
        return await self._drafter.propose(
            task.task_id, tokens, k, sampling, generated=generated, seed=seed
        )

    def _speculation_for(self, replicated: bool, began: float) -> Speculation:
        """Speculation runs for unchecked and audited requests. An audit holds each
        verify step's records to the rows the request kept (those before the first
        rejected draft token, which is all one prefill of the final sequence sees), so
        its records must fingerprint each position apart (`byzantine.fingerprint_chunk`
        1, the default): with longer chunks a request decodes one token per traversal.
        Replicate mode judges a step's lanes by their last row and replays them from
        their history: replicated requests never speculate."""
        if replicated:
            return PLAIN
        if self._shapes is not None and self._shapes.accepted(began).chunk != 1:
            return PLAIN
        return self._speculation

    def retune(
        self,
        *,
        step_timeout_s: float,
        verification: Mode,
        audit_fraction: float,
        tolerance: Tolerance,
        records: RecordSize | None = None,
        lone_ranges: bool = True,
    ) -> None:
        """Apply changed settings (network.step_timeout_ms, byzantine.verification,
        audit_fraction, audit_lone_ranges, rtol/atol, the fingerprint's shape): steps
        waiting now and every later one use the new timeout; steps from now on are sized
        for the records both the new and the previous fingerprint shape make (a larger
        top_k sized as the old one overflowed the frame header and failed every long
        prompt); the check, its sampling and its tolerance apply from the next request
        (a running one keeps its check, so it is never checked half one way and half the
        other). A mode whose part was not built runs as "none", as it did from the start;
        `supports` lets a config check refuse such a change beforehand."""
        self._sender.timeout, self._audit_fraction = step_timeout_s, audit_fraction
        if records is not None and self._sender.records is not None:
            self._sender.records = records.covering(self._sender.records)
        if records is not None and self._shapes is not None:
            self._retune_shape(Shape(records.top_k, records.chunk))
        self._mode = verification if self.supports(verification) else "none"
        if self._auditor is not None:
            self._auditor.retune(tolerance, lone_ranges)
        if self._replicator is not None:
            self._replicator.retune(tolerance)

    def _retune_shape(self, shape: Shape) -> None:
        """Start the grace of a changed fingerprint shape; an unchanged one leaves it
        running (as `AgreementDriver.retune` leaves its timers): every config change
        retunes the engine, and an unrelated one (a label, a token) during the grace ended
        it, so records of the shape before, which nodes still sign until they take the
        change, were judged weak and the requests came back unverified."""
        if self._shapes is not None and shape != self._shapes.agreed:
            self._shapes.change(shape, time.monotonic())

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
    def routed_around(self) -> frozenset[NodeId]:
        """The nodes whose claims that a request could not be served were not believed:
        new requests avoid them until the plan changes (`claims.Claims`)."""
        return self._claims.avoided

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

    def _members(self) -> frozenset[NodeId]:
        """The nodes the current plan holds: those an audit of an earlier plan may ask."""
        plan = self._plan()
        return plan.members if plan is not None else frozenset()

    async def on_result(self, peer: NodeId, env: Envelope) -> None:
        """The node's route for StepResult and StepError frames (`intake.Intake`)."""
        await self._intake.on_result(peer, env)

    async def serve_batches(self) -> None:
        """Send queued steps, batched (`sending.StepSender.serve_batches`); the draft
        model, if any, loads meanwhile (`drafter.ModelDrafter.warm`)."""
        warming = asyncio.create_task(self._drafter.warm()) if self._drafter else None
        try:
            await self._sender.serve_batches()
        finally:
            if warming is not None:
                warming.cancel()

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

    def _chain(self, request_id: RequestId, epoch: int) -> tuple[NodeId, ...]:
        """The nodes of the request's route if the plan is still that of `epoch`, else
        none."""
        plan = self._plan()
        if plan is None or plan.epoch != epoch:
            return ()
        return self._claims.route(request_id, plan) or plan.nodes

    async def _compute(
        self, request_id: RequestId, step: int, pos: int, x: torch.Tensor, last_only: bool = True
    ) -> torch.Tensor:
        """One step: down the request's route (the chain, unless claims moved it:
        `claims.Claims`), or in replicate mode down f+1 lanes that must agree.
        `last_only` false (a speculative verify step): logits for every position."""
        if self._replicator is None or request_id not in self._replicating:
            plan = self._plan()
            route = self._claims.route(request_id, plan) if plan is not None else ()
            return await self._sender.step(request_id, step, pos, x, route, last_only=last_only)
        return await self._replicator.step(self, request_id, step, pos, x)

    async def lane_step(
        self, wire_id: RequestId, step: int, start: int, x: torch.Tensor, route: Lane
    ) -> tuple[torch.Tensor, list[Proof]]:
        """A step of one replicate lane (its own request id on the wire) and its records."""
        records = self._flight.records.setdefault(wire_id, [])
        self._flight.checked.add(wire_id)
        out = await self._sender.step(wire_id, step, start, x, route)
        mine = [p for p in records if p.step == step]
        records[:] = [p for p in records if p.step > step]
        return out, mine

    async def release_lane(self, wire_id: RequestId, nodes: Iterable[NodeId]) -> None:
        self._flight.forget(wire_id)
        await self._caches.release_on(wire_id, nodes)

    def plan_changed(self) -> None:
        """Fail every step sent on an older plan: its chain may include a node that is
        gone. Each request then resumes on the new plan (see `_generate`); steps already
        sent on the new plan go on."""
        epoch = self._epoch()
        # a relayed step's first half, or one hop of a step re-run node by node, too
        halves = ((key, fut) for key, (fut, _) in self._flight.relaying.items())
        pending: list[tuple[Key, asyncio.Future[Any]]] = [*self._flight.waiting.items(), *halves]
        for key, fut in pending:
            if not fut.done() and self._flight.sent_in.get(key, epoch) < epoch:
                fut.set_exception(StageLost("the stage plan changed while the step ran"))
        self._plan_version.set()

    def _refuse_if_unserved(self) -> None:
        """No plan could be put in force: fail now, saying why, rather than send steps
        down a plan some of whose holders never loaded their layers."""
        why = self._unserved()
        if why is not None:
            raise ServiceUnavailable(why)

    async def _await_plan_change(self, epoch: int) -> None:
        """After a failed step: until the plan moves past `epoch`, no plan can be put in
        force (`unserved`), or a bounded wait (a transient error is then retried on the
        same plan)."""
        deadline = time.monotonic() + self._recovery_wait_s
        self.waiting_for_plan += 1
        try:
            while time.monotonic() < deadline and self._unserved() is None:
                plan = self._plan()
                if plan is not None and plan.epoch > epoch:
                    return
                self._plan_version.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._plan_version.wait()
        finally:
            self.waiting_for_plan -= 1

    async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        """Run one request; its log lines carry its id, and a sampled one is traced."""
        request_id = task.task_id
        context = REQUEST_ID.set(request_id)
        trace = None
        if self._tracing is not None:
            trace = self._tracing.start_request(
                request_id,
                {
                    "butterfly.prompt_tokens": len(task.input_ids),
                    "butterfly.max_new_tokens": task.max_new_tokens,
                    "butterfly.verification": self._mode,
                },
            )
        if trace is not None:
            self._flight.traced[request_id] = trace.context
        log.debug("request %s: %d prompt tokens", request_id, len(task.input_ids))
        try:
            result = await self._run(task, on_token)
        except BaseException as e:
            if trace is not None:
                trace.end({}, error=f"{type(e).__name__}: {e}")
            raise
        finally:
            self._flight.traced.pop(request_id, None)
            REQUEST_ID.reset(context)
        if trace is not None:
            trace.end(
                {
                    "butterfly.generated_tokens": len(result.output_ids),
                    "butterfly.verified": result.verified,
                    "butterfly.recoveries": int(result.timings.get("recoveries", 0)),
                }
            )
        return result

    async def _run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        self._refuse_if_unserved()
        plan = self._plan()
        if plan is None:
            raise ServiceUnavailable("the cluster has no stage plan yet; retry shortly")
        request_id = task.task_id
        started, began = time.perf_counter(), time.monotonic()
        timings: dict[str, float] = {}
        # the settings at the start hold for the whole request (see `retune`)
        replicator = self._replicator if self._mode == "replicate" else None
        auditor = self._auditor if self._mode == "audit" else None
        fraction = self._audit_fraction
        if task.input_ids and len(task.input_ids) + task.max_new_tokens - 1 > self._max_context:
            raise ContextLengthExceeded(  # the gateway can tell: no stage is asked
                f"the prompt of {len(task.input_ids)} tokens plus max_new_tokens "
                f"{task.max_new_tokens} needs {len(task.input_ids) + task.max_new_tokens - 1} "
                f"positions; the model's context is {self._max_context}"
            )
        if task.stop and self._tokenizer is None:
            raise InvalidInput("stop strings need the model's tokenizer; this gateway has none")
        if task.sampling.prompt_logprobs is not None and replicator is not None:
            raise InvalidInput(
                "the prompt's logprobs (echo with logprobs) are not served under "
                "byzantine.verification = replicate: its lanes are compared on the last "
                "position only; ask without echo, or use audit or none"
            )
        if replicator is not None or auditor is not None:
            self._flight.checked.add(request_id)  # its nodes sign records (verification is on)
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
            # a checkpoint left by a gateway that died: only the first run goes on from it
            # (a re-run after a failed audit starts over)
            saved = self._resume(request_id) if self._resume is not None else None
            attempt = saved.attempt if saved is not None else 0  # runs a retraction ended
            for _ in range(self._max_recoveries):
                steps = Steps()
                self._flight.records[request_id] = []
                result = await self._generate(
                    task,
                    request_id,
                    on_token,
                    started,
                    timings,
                    steps,
                    saved,
                    speculation=self._speculation_for(replicator is not None, began),
                    chunk=self._prefill_chunk,
                    attempt=attempt,
                    recheck=auditor is not None and fraction > 0,
                )
                self.chunk_times.finished(request_id)  # not decoding while it is audited
                saved = None
                if replicator is not None:
                    return replace(result, verified=replicator.finish(request_id))
                # a run after one the audit withdrew is audited whatever audit_fraction
                # draws: the answer withdrawn was wrong, and a rerun came back unchecked
                if auditor is None or not steps.positions:
                    return result  # (no position computed: an echo of max_tokens 0)
                if not attempt and self._audit_draw() >= fraction:
                    return result
                verdict = await audit_request(
                    auditor,
                    steps,
                    self._flight.records.get(request_id, []),
                    task,
                    result,
                    emit=self._emit,
                    on_liars=self._on_liars,
                    weakest=self._shapes.accepted(began) if self._shapes else None,
                    members=self._members(),
                )
                if verdict.verified:
                    return replace(result, verified="audit")
                if not verdict.liars and not verdict.recompute:
                    log.warning("request %s unverified: %s", request_id, verdict.reason)
                    return result
                # the chain lied: its node is being evicted; or it computed on caches
                # from before its plan that the re-execution contradicts (a liar's KV
                # copy on the standby that took its stage: it returned the wrong tokens
                # as unverified). Either way the request runs again from fresh caches
                epoch = self._epoch()
                # the withdrawn run's checkpoint goes first, here and on the standbys,
                # before the retraction and the wait for the eviction: a successor of a
                # gateway that dies from now on starts over, where it resumed the lie
                attempt += 1
                if self._on_checkpoint is not None:
                    self._on_checkpoint(request_id, fresh_checkpoint(task, epoch, attempt))
                if verdict.liars:
                    liars = ", ".join(str(n) for n in verdict.liars)
                    why = f"the audit caught node(s) {liars} lying"
                else:
                    log.warning("request %s computed again: %s", request_id, verdict.reason)
                    why = "the audit found caches from before the plan wrong"
                on_token(Retraction(f"{why}; computing again"))
                if verdict.liars:
                    await self._await_plan_change(epoch)
                await self._caches.release(request_id)
            raise ServiceUnavailable(f"request {request_id} failed its audit repeatedly")
        finally:
            self.chunk_times.finished(request_id)
            if self._drafter is not None:
                await asyncio.shield(self._drafter.release(request_id))
            self._claims.finished(request_id)
            self._flight.forget(request_id)
            await asyncio.shield(self._caches.release_finished(request_id))
            if replicator is not None:
                self._replicating.discard(request_id)
                await replicator.release(self, request_id)

    async def _generate(
        self,
        task: InferenceTask,
        request_id: RequestId,
        on_token: TokenSink,
        started: float,
        timings: dict[str, float],
        steps: Steps,
        saved: Checkpoint | None = None,
        *,
        speculation: Speculation = PLAIN,
        chunk: int = 0,
        attempt: int = 0,
        recheck: bool = False,
    ) -> InferenceResult:
        """Token by token; the gateway's history and RNG are the canonical checkpoint.

        When a step is lost (a node died, the plan changed), the request waits for the new
        plan and replays its whole history (prompt + tokens so far) as one prefill from
        position 0: every stage cuts its cache back to 0 and recomputes, so the next token
        is exactly the one the request would have produced. The RNG is only advanced by
        tokens actually sampled, so sampled requests continue identically too. A plan
        that moved on between two steps (a node taken back, a re-plan asked for) may have
        moved layers and their caches with it: the request resumes the same way.

        `saved` (a checkpoint a dead gateway left) starts the request where it was
        (`generation.Generation`); its first step is the same whole-history prefill a
        recovery makes. `attempt`: the run its checkpoints belong to (one more after each
        retraction: `store.Checkpoint.attempt`). `recheck` (the request is audited): one
        resumed with every token sends its history once as a prefill all the same, so its
        audit has a step to read (`Generation.recheck`).

        `speculation`: a decode step carries a draft of the request's own text and yields
        the tokens it confirms (`dataplane.speculate`); the next step's start rolls the
        stages' caches back past the first rejected position. `chunk` (> 0): a longer
        input (a prompt, a replay) goes in steps of at most that many positions, so the
        decode steps of other requests, batched with each, wait one chunk instead of the
        whole; fewer while others decode and this machine's measured cost of a position
        would add more than half their decode step to their gap (`schedule.chunks`).

        `task.stop`: the text is detokenized as tokens come, and generation ends at the
        token that completes a stop string, as at end of sequence. `prompt_logprobs`: a
        step holding prompt positions not scored yet asks the last stage for every
        position's logits (signed as any step's output: they are the bytes it sends),
        scored here as sampled tokens are; `steps.every_row` gets those steps, whose
        last-stage records the audit then reads as covering every position. `steps` gets
        each step whose output was used, with the plan it ran under (a request that went
        on after the plan moved is audited under each plan it ran under), and each replay:
        a step stays in the audit when a replay recomputes its rows, since the tokens it
        led to were chosen from its output, which only its own records vouch for
        (dropped, a liar's logits before a replay from 0 went unchecked, and its answer
        came back verified: a review).
        """
        gen = Generation(task, on_token, self._eos, self._emit, self._tokenizer, saved)
        if gen.resumed:
            timings["resumed_from_checkpoint"] = float(len(gen.out))
            log.info("request %s resumes from its checkpoint at token %d", request_id, len(gen.out))
            if recheck and gen.out and not gen.more():
                gen.recheck()
                steps.replayed_from(0)
        step, recoveries, traversals = 0, 0, 0
        # the start of the step first lost in a row, until a step answers again
        lost_at: float | None = None
        based_on = self._epoch()  # the plan whose caches `gen.pos` counts on
        while gen.more():
            if self._epoch() != based_on:
                gen.replay_from(await self._replay_from(request_id, gen.length, steps))
            epoch = based_on = self._epoch()
            step += 1  # step ids are never reused, so a late answer is ignored
            step_started = time.perf_counter()
            drafting = gen.drafting
            proposed = await self._draft(task, gen, speculation) if drafting else Draft()
            if self._epoch() != based_on:  # the plan moved while the small model drafted
                continue
            # a long prompt or replay goes in steps whose signed records fit a frame
            # header, at most: one 1,000-position step gathers 64 KB of them at f = 1
            plan = self._plan()
            cap = self._sender.max_positions(len(plan.stages)) if plan is not None else 0
            times = self.chunk_times
            sized = chunk_length(chunk, times, request_id) if gen.pending > 1 else chunk
            head = gen.step_input(
                min(c for c in (sized, cap, gen.pending) if c > 0), proposed.tokens
            )
            # a lane may resend
            timed = not proposed.tokens and request_id not in self._replicating
            mark = times.started(request_id, head.shape[1] if timed else 0, stream=bool(gen.out))
            answered: float | None = None
            # rows of prompt positions this step would score, when asked and not yet done
            to_score = gen.to_score(head.shape[1])
            try:
                rows = bool(proposed.tokens) or to_score > 0
                logits = await self._compute(request_id, step, gen.pos, head, not rows)
                answered = time.perf_counter() - step_started
                # the plan it ran under, where its result was vouched for under another
                plan = self._flight.answered_under.pop((request_id, step), plan)
                steps.used(step, gen.pos, head.shape[1], plan)  # its output was used
                if to_score:
                    steps.every_row.add(step)
                    gen.score_prompt(logits, to_score)
                if lost_at is not None:  # decoding resumed: the whole gap was recovery
                    timings["recovery_s"] = timings.get("recovery_s", 0.0) + (
                        time.perf_counter() - lost_at
                    )
                    lost_at = None
                if self._timeouts is not None:
                    self._timeouts.answered(self._chain(request_id, epoch))
            except ButterflyError as e:
                self._report(e, f"step {step} of {request_id}")
                if not e.retriable and not self._contested(request_id, e):
                    raise  # the error tree decides: no list of classes here
                stays = False  # the node that held the step back stays in the plan
                if isinstance(e, SendTimeout) and self._timeouts is not None:
                    what = f"step {step} of {request_id}"
                    if e.blame is not None:
                        stays = await self._timeouts.timed_out(e.blame, what)
                    else:  # a chain's step: only a one-node chain says who held it back
                        await self._timeouts.chain_timed_out(self._chain(request_id, epoch), what)
                # a step a heartbeating node held back counts toward its eviction, not the
                # request's recoveries: replayed at once, the request ran out of them before
                # a limit over 8 evicted the node (a review)
                recoveries += 0 if stays else 1
                if recoveries > self._max_recoveries:
                    raise
                if not e.retriable:  # a claim not believed: replay it all on the new route
                    steps.replayed_from(0)
                    gen.replay_from(0)
                    continue
                # from the lost step's start, the last progress the gateway saw, to the
                # replayed step's answer: the time to detect the loss counts (a kill is
                # noticed by a timeout or a broken connection well after it happened),
                # and so does the replay that resumes decoding, not only the re-plan
                if lost_at is None:
                    lost_at = step_started
                log.warning(
                    "request %s lost a step at token %d (%s); replaying",
                    request_id,
                    len(gen.out),
                    e,
                )
                if not stays:  # a plan without a node that withholds steps comes of nothing
                    await self._await_plan_change(epoch)
                self._refuse_if_unserved()
                based_on = self._epoch()
                gen.replay_from(await self._replay_from(request_id, gen.length, steps))
                timings["resumed_at"] = float(gen.pos)
                continue
            finally:
                times.ended(mark, answered)
            traversals += 1
            before, start = len(gen.out), gen.pos
            got = gen.take(logits, head.shape[1], proposed, drafting)
            if proposed.tokens:  # the rows up to the first rejected draft token are kept
                steps.used(step, start, max(1, len(got)), plan)
                steps.every_row.add(step)
            every = self.checkpoint_every
            crossed = every > 0 and len(gen.out) // every > before // every  # a verify: several
            if self._on_checkpoint is not None and crossed:
                self._on_checkpoint(request_id, gen.checkpoint(epoch, attempt))
        steps.drawn = gen.drawn  # held to the re-executed logits by the audit
        steps.inherited = gen.inherited
        total = time.perf_counter() - started
        if gen.first_token_at is not None:  # a request resumed with tokens made none here
            timings["time_to_first_token_s"] = gen.first_token_at - started
        timings["total_s"] = total
        timings["traversals"] = float(traversals)
        if recoveries:
            timings["recoveries"] = float(recoveries)
        produced = len(gen.out)
        if produced > 1 and "time_to_first_token_s" in timings:  # not when resumed at the end
            timings["time_per_output_token_s"] = (total - timings["time_to_first_token_s"]) / (
                produced - 1
            )
        plan = self._plan()
        result = self._result(task, plan, tuple(gen.out), (), timings)
        prompt_scored = gen.prompt_scores.scores() if gen.prompt_scores is not None else ()
        result = replace(result, logprobs=gen.logprobs(), prompt_logprobs=prompt_scored)
        cut = gen.text_before_stop()
        return result if cut is None else replace(result, text=cut, cut_at_stop=True)

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
            proofs=tuple(encode(p) for p in self._flight.records.get(str(task.task_id), ())),
        )

    def _contested(self, request_id: RequestId, e: ButterflyError) -> bool:
        """Whether a non-retriable error is another node's claim that is not (yet)
        believed (`claims.Claims`): the request then replays on a route around it. A
        claim that holds is raised as the error the request fails with; errors of the
        gateway's own making, and replicate requests (the replicator weighs their
        lanes' claims itself), are not contested."""
        plan = self._plan()
        if e.blame is None or plan is None or request_id in self._replicating:
            return False
        failure = self._claims.claim(request_id, plan, e.blame, str(e))
        if failure is not None:
            raise failure from e
        return True

    async def _replay_from(self, request_id: RequestId, length: int, steps: Steps) -> int:
        """Where a request of `length` tokens goes on after the plan moved on."""
        start = await self._resume_at(request_id, length)
        steps.replayed_from(start)
        return start

    async def _resume_at(self, request_id: RequestId, length: int) -> int:
        """Where a request resumes on a new plan (`caches.Caches.resume_at`, asking the
        nodes of its route); from 0 for a replicate request: its lanes run under their
        own wire ids, and the replicator replays them itself."""
        if request_id in self._replicating:
            return 0
        plan = self._plan()
        route = self._claims.route(request_id, plan) if plan is not None else ()
        return await self._caches.resume_at(request_id, length, route)
