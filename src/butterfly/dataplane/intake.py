"""The gateway's intake of step results: who may answer, and who vouches for the bytes.

A StepResult or StepError is taken only from a node of the route its step was sent on
(the result from its last node), judged by the authenticated peer; for a checked request
the signed records must vouch for the very bytes received (`proving.culprit`) before the
result is used. Anything else is dropped and counted, or convicts the node that lied.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import torch

from butterfly.dataplane.inflight import InFlight, Relayed, StepFailed
from butterfly.dataplane.proving import culprit, decode_proofs, route_signers
from butterfly.metrics.events import Emit, MessageDropped
from butterfly.net.framing import Envelope
from butterfly.protocol.entitled import Context, entitled
from butterfly.runtime.wire import decode_tensor
from butterfly.types.errors import ButterflyError, StageLost
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Proof
from butterfly.types.wire.data import StepError, StepResult

log = logging.getLogger(__name__)

OnLiars = Callable[[tuple[NodeId, ...], str], Awaitable[None]]


def _rows_of(msg: StepResult | StepError, out: torch.Tensor | None) -> list[tuple[int, int]] | None:
    """Each entry's rows [from, to) of a result's payload: one each, or `widths` (a
    verify step's every position); None when the widths do not add up to the payload
    (the last node sent a malformed result: every entry then fails as invalid)."""
    n = len(msg.request_ids)
    if not isinstance(msg, StepResult) or not msg.widths:
        return [(i, i + 1) for i in range(n)]
    if out is None or len(msg.widths) != n or min(msg.widths) < 1:
        return None
    if sum(msg.widths) != out.shape[1]:
        return None
    ends = list(itertools.accumulate(msg.widths))
    return [(end - w, end) for end, w in zip(ends, msg.widths, strict=True)]


@dataclass(frozen=True)
class Intake:
    """Takes the answers to the steps in `flight` (the table the sender fills)."""

    node: NodeId
    plan: Callable[[], StagePlan | None]
    flight: InFlight
    keys: Mapping[NodeId, bytes] | None
    max_tensor_bytes: int
    emit: Emit
    on_liars: OnLiars
    # the model's vocabulary, which every row of a result's logits spans (0: no logits,
    # an encoder's output): logits wider or narrower than it, signed as sent, made the
    # gateway pick a token no stage has, and the request failed as the client's fault
    # with nobody evicted (a review)
    vocab: int = 0

    async def on_result(self, peer: NodeId, env: Envelope) -> None:
        """The node's route for StepResult and StepError frames: taken only from a node
        of the route each step it answers was sent on (the result from its last node),
        judged by the authenticated `peer`; anything else is dropped and counted before
        a byte of it (records included) is used."""
        msg = env.msg
        if not isinstance(msg, StepResult | StepError):
            return
        flight = self.flight
        waited = [k for k in zip(msg.request_ids, msg.steps, strict=False) if flight.awaited(k)]
        if not waited:
            return  # late or duplicate answers for steps nobody waits for any more
        for key in waited:
            ctx = Context(self.node, self.node, self.plan(), flight.sent_on.get(key, ()))
            if not entitled(msg, peer, ctx):
                self.emit(MessageDropped(reason=f"not_entitled_{msg.kind}"))
                log.warning(
                    "dropped %s from node %s: step %s was not sent to it", msg.kind, peer, key
                )
                return
        out = None
        # a batch's records, decoded once (not per request); each request keeps those of
        # the answer it takes (`_keep`)
        proofs = list(decode_proofs(msg.proofs)) if isinstance(msg, StepResult) else []
        if isinstance(msg, StepResult):
            try:
                out = decode_tensor(env.payload, self.max_tensor_bytes)
            except ButterflyError as e:
                msg = StepError(msg.request_ids, msg.steps, msg.node, e.kind, str(e), True)
        relayed = flight.relaying.get((msg.request_ids[0], msg.steps[0])) if msg.steps else None
        if relayed is not None and len(msg.request_ids) == 1:
            await self._relayed(peer, msg, proofs, out, *relayed)
            return
        liars: dict[NodeId, str] = {}
        spans = _rows_of(msg, out)
        for i, key in enumerate(zip(msg.request_ids, msg.steps, strict=False)):
            fut = flight.waiting.get(key)
            if fut is None or fut.done():
                continue  # late or duplicate answer for a step nobody waits for any more
            if out is None or spans is None or out.shape[1] < spans[i][1]:
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
            elif isinstance(msg, StepResult) and spans[i][1] - spans[i][0] != flight.rows.get(
                key, spans[i][1] - spans[i][0]
            ):
                # rows the gateway's dispatch did not ask for: a verify step answered with
                # its last row only failed the request where confirming its draft (a review)
                asked, got = flight.rows[key], spans[i][1] - spans[i][0]
                liars[peer] = f"step {key[1]} of {key[0]}: {got} row(s) of logits for {asked}"
                fut.set_exception(StageLost(f"node {peer} answered {got} row(s) for {asked}"))
            elif isinstance(msg, StepResult) and self.vocab and out.shape[-1] != self.vocab:
                got = out.shape[-1]
                liars[peer] = f"step {key[1]} of {key[0]}: logits {got} wide for a vocabulary of"
                liars[peer] += f" {self.vocab}"
                fut.set_exception(StageLost(f"node {peer} answered logits {got} wide"))
            elif isinstance(msg, StepResult):
                start, end = spans[i]
                # a slice is a torch operation: 10-30 µs on a cold gateway (AMD EPYC)
                row = out if (start, end) == (0, out.shape[1]) else out[:, start:end]
                plan = self.plan()
                stages = len(plan.stages) if plan is not None else 0
                try:
                    liar = self._vouched(peer, msg, proofs, i, row, stages)
                except StageLost as e:
                    fut.set_exception(e)
                    continue
                if liar is None:
                    self._keep(key, proofs)
                    fut.set_result(row)
                else:
                    liars[liar] = f"step {key[1]} of {key[0]}"
                    fut.set_exception(StageLost(f"node {liar} lied about step {key[1]}"))
        for liar, what in liars.items():
            await self.on_liars((liar,), f"signed records contradict {what} (the gateway's check)")

    async def _relayed(
        self,
        peer: NodeId,
        msg: StepResult | StepError,
        proofs: list[Proof],
        out: torch.Tensor | None,
        first: Relayed,
        upto: int,
    ) -> None:
        """The answer to the first half of a relayed step (`StepSender.relay`)."""
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
        await self.on_liars((liar,), f"signed records contradict {what} (the gateway's relay)")

    def _keep(self, key: tuple[RequestId, int], proofs: list[Proof]) -> None:
        """The records of the answer a step takes, in place of any the request holds for
        that step: a step re-run (a relay, one node at a time) and the late answer of its
        first run both arrive, signed over other bytes (a batch against one row), and the
        audit, which keeps the first record of each stage, mixed them (a review)."""
        rid, step = key
        records = self.flight.records.get(rid)
        if records is not None:
            records[:] = [p for p in records if p.step != step]
            records.extend(p for p in proofs if p.request_id == rid and p.step == step)

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
        plan = self.plan()
        epoch = self.flight.sent_in.get(key)
        if self.keys is None or rid not in self.flight.checked or epoch is None:
            return None
        if plan is None or plan.epoch != epoch:  # no plan to check against: not used
            raise StageLost(f"the plan moved on while step {step} of {rid} ran")
        self.flight.answered_under[key] = plan
        route = self.flight.sent_on.get(key, ())

        def holders(j: int) -> tuple[NodeId, ...]:
            return plan.holders(plan.stages[j][1])

        found = culprit(
            proofs,
            keys=self.keys,
            request_id=rid,
            step=step,
            upto=upto,
            received=received,
            # the route covers the last stages of the `upto` (a relay's second half)
            signers=route_signers(route, upto - len(route), holders),
            epoch=epoch,
            peer=peer,
            sent=self.flight.sent_digest.get(key),
        )
        if found is None:
            return None
        liar, why = found
        log.error("step %s of %s: node %s lied: %s", step, rid, liar, why)
        return liar
