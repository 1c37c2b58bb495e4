"""The gateway's table of steps in flight: what each was sent on, who may answer it.

One table is shared by the sending side (`sending.StepSender`, which fills it) and the
intake of results (`intake.take_result`, which reads it before using a byte of an
answer), so both judge a step by the same record of where it went.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from butterfly.types.errors import ButterflyError, ConnectionFailed, InvalidInput, StageLost
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Proof
from butterfly.types.wire.data import StepError

Key = tuple[str, int]  # (request id, step)
Relayed = asyncio.Future[tuple[torch.Tensor, tuple[bytes, ...]]]


NEXT_UNREACHABLE = "next_unreachable"
"""A stage's answer when it cannot send its output on to the next node of the route."""
DISPATCH_REFUSED = "dispatch_refused"
"""A stage's answer to a gateway whose signed step it may not run (protocol.dispatch)."""


@dataclass
class StepFailed(Exception):
    """A step answered with an error, by `sender` (the authenticated peer, which is the
    one to blame: the node the error names is only what the frame claims)."""

    error: StepError
    sender: NodeId

    def failure(self, step: int, route: Sequence[NodeId]) -> ButterflyError:
        """The error the request meets, charged (`blame`, for `butterfly_peer_errors_total`)
        where it points: a stage that could not reach the next node of `route` names
        that node, not itself; a dispatch it may not run names nobody."""
        err, sender = self.error, self.sender
        message = f"node {sender} failed step {step}: {err.message}"
        if not err.retriable:
            return InvalidInput(message, blame=sender)
        if err.error_type == DISPATCH_REFUSED:
            return StageLost(message)
        at = route.index(sender) if sender in route else len(route)
        if err.error_type == NEXT_UNREACHABLE and at + 1 < len(route):
            return StageLost(message, blame=route[at + 1])
        return ConnectionFailed(message, blame=sender)


@dataclass
class Entry:
    request_id: RequestId
    step: int
    start: int
    x: torch.Tensor  # [1, T] token ids or [1, T, D] vectors
    future: asyncio.Future[torch.Tensor]
    route: tuple[NodeId, ...] = ()  # replicate mode's lanes; () is the plan's chain
    last_only: bool = True  # the last stage answers the last position only (not a verify)


@dataclass
class InFlight:
    waiting: dict[Key, asyncio.Future[torch.Tensor]] = field(default_factory=dict)
    # (request, step) -> (future of the output and records, stages it covers), for
    # the first half of a relayed step (`sending.StepSender.relay`)
    relaying: dict[Key, tuple[Relayed, int]] = field(default_factory=dict)
    sent_in: dict[Key, int] = field(default_factory=dict)  # the epoch a step was sent in
    # the route a step was sent on: only its nodes may answer it (protocol.entitled)
    sent_on: dict[Key, tuple[NodeId, ...]] = field(default_factory=dict)
    sent_digest: dict[Key, bytes] = field(default_factory=dict)  # what stage 0 was sent
    checked: set[str] = field(default_factory=set)  # requests (and lanes) needing records
    # traced requests -> the context their steps carry (metrics.tracing); empty when off
    traced: dict[str, bytes] = field(default_factory=dict)
    records: dict[str, list[Proof]] = field(default_factory=dict)
    # the plan a checked step's result was vouched for under (`intake.Intake._vouched`):
    # the plan the step ran under, which the engine files its records by. The plan the
    # engine read before queueing it was older where the plan moved before the batch
    # went out, and its audit missed the records ("stage 0 sent no signed record": a
    # review)
    answered_under: dict[Key, StagePlan] = field(default_factory=dict)
    # when the gateway's own first stage handed a step on (time.monotonic)
    handed: dict[Key, float] = field(default_factory=dict)
    # rows of logits a step asked for: 1, or every position of a verify step
    rows: dict[Key, int] = field(default_factory=dict)

    def sent(self, key: Key, epoch: int, on: tuple[NodeId, ...], digest: bytes) -> None:
        """A step sent in `epoch` down `on` (whose nodes alone may answer it), stage 0
        given the bytes of `digest`."""
        self.sent_in[key], self.sent_on[key], self.sent_digest[key] = epoch, on, digest

    def forget(self, request_id: str) -> None:
        """A finished request's (or lane's) records and the plans its steps ran under."""
        self.records.pop(request_id, None)
        self.checked.discard(request_id)
        for key in [k for k in self.answered_under if k[0] == request_id]:
            del self.answered_under[key]

    def settled(self, key: Key) -> None:
        """Nobody waits for this step any more (its answer taken, or given up)."""
        tables = (self.waiting, self.relaying, self.sent_in, self.sent_on, self.sent_digest)
        for table in (*tables, self.handed, self.rows):
            table.pop(key, None)

    def awaited(self, key: Key) -> bool:
        """Whether someone still waits for this step (directly or as a relay's half)."""
        return (key in self.waiting and not self.waiting[key].done()) or (
            key in self.relaying and not self.relaying[key][0].done()
        )
