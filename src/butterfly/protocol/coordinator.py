"""The coordination phase machine, the barrier, and routing of messages by kind.

One node's coordinator composes three reducers and interprets what they decide:
the failure detector (heartbeats -> health changes), PBFT (requests -> a decided log) and
the barrier (ready stage nodes -> start serving). Its phases follow an epoch's life:

    ASSIGNMENT --plan decided--> SYNCHRONIZATION --all ready--> COMPUTATION
         ^                          |       ^                        |
         |                          v       |                        v
         +--- (first plan) -- RECONFIGURATION <--failure/evidence----+

A membership change is never computed and applied locally: the node that sees a failure
(phi past the failed threshold, f+1 peers' suspicions, or evidence) proposes a
`Reconfigure` as a PBFT request, and every node applies it only once PBFT executes it, at
the same point of the same log (DESIGN.md section 3). The PBFT group itself is fixed for a
coordinator's life; epochs change the serving membership and stage plan.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import assert_never

import msgpack

from butterfly.protocol import failure_detector, pbft
from butterfly.protocol.failure_detector import DetectorState, Health, PhiAccrualFailureDetector
from butterfly.protocol.inputs import Tick
from butterfly.protocol.pbft_state import PbftConfig, ReplicaState, Send
from butterfly.protocol.quorum import weak_quorum
from butterfly.protocol.sign import SigningKey, sign_message, verify_message
from butterfly.types.errors import InvalidMessage, PhaseTransitionFailed
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import (
    KINDS,
    BarrierReady,
    CheckpointVote,
    Commit,
    Evidence,
    Message,
    NewView,
    Prepare,
    PrePrepare,
    Proof,
    Reconfigure,
    Reply,
    Request,
    StateTransfer,
    Status,
    Suspicion,
    ViewChange,
    decode,
    encode,
)
from butterfly.types.wire.control import Heartbeat

RESEND_INTERVAL = 1.0
"""Seconds between retransmissions of an undecided proposal."""


class Phase(enum.StrEnum):
    ASSIGNMENT = "assignment"  # no plan yet for this epoch
    SYNCHRONIZATION = "synchronization"  # plan decided; waiting at the barrier
    COMPUTATION = "computation"  # every stage node ready; serving requests
    RECONFIGURATION = "reconfiguration"  # a membership change is going through PBFT


NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.ASSIGNMENT: frozenset({Phase.SYNCHRONIZATION, Phase.RECONFIGURATION}),
    Phase.SYNCHRONIZATION: frozenset(
        {Phase.SYNCHRONIZATION, Phase.COMPUTATION, Phase.RECONFIGURATION}
    ),
    Phase.COMPUTATION: frozenset({Phase.SYNCHRONIZATION, Phase.RECONFIGURATION}),
    Phase.RECONFIGURATION: frozenset({Phase.SYNCHRONIZATION}),
}


class Route(enum.StrEnum):
    DETECTOR = "detector"
    CONSENSUS = "consensus"
    BARRIER = "barrier"
    COORDINATOR = "coordinator"
    VERIFICATION = "verification"
    CLIENT = "client"


ROUTES: dict[str, Route] = {
    "heartbeat": Route.DETECTOR,
    "request": Route.CONSENSUS,
    "pre_prepare": Route.CONSENSUS,
    "prepare": Route.CONSENSUS,
    "commit": Route.CONSENSUS,
    "checkpoint": Route.CONSENSUS,
    "view_change": Route.CONSENSUS,
    "new_view": Route.CONSENSUS,
    "status": Route.CONSENSUS,
    "state_transfer": Route.CONSENSUS,
    "evidence": Route.CONSENSUS,
    "reply": Route.CLIENT,
    "barrier_ready": Route.BARRIER,
    "suspicion": Route.COORDINATOR,
    "reconfigure": Route.COORDINATOR,
    "proof": Route.VERIFICATION,
}
if set(ROUTES) != set(KINDS):  # checked at import: a new kind must be given a route
    raise RuntimeError(f"unrouted message kinds: {sorted(set(KINDS) - set(ROUTES))}")


def route(message: Message) -> Route:
    """Which component handles a message: drivers and metrics label by this."""
    return ROUTES[message.kind]


def plan_digest(epoch: Epoch, members: tuple[NodeId, ...]) -> bytes:
    """Identifies a plan; every member must report ready for exactly this digest."""
    return hashlib.sha256(msgpack.packb([int(epoch), [int(m) for m in members]])).digest()


@dataclass(frozen=True, slots=True)
class Barrier:
    """Every member of a plan reports ready (for this epoch and digest) before serving."""

    epoch: Epoch
    digest: bytes
    expected: frozenset[NodeId]
    arrived: frozenset[NodeId] = frozenset()

    def arrive(self, node: NodeId, epoch: Epoch, digest: bytes) -> Barrier:
        """Count `node`; reports for another epoch or plan, or from strangers, do not count."""
        if epoch != self.epoch or digest != self.digest or node not in self.expected:
            return self
        return Barrier(self.epoch, self.digest, self.expected, self.arrived | {node})

    @property
    def complete(self) -> bool:
        return self.arrived == self.expected

    @property
    def waiting_for(self) -> frozenset[NodeId]:
        return self.expected - self.arrived


@dataclass(slots=True)
class CoordinatorState:
    node: NodeId
    key: SigningKey
    keys: tuple[bytes, ...]  # every node's public key, by node id
    replica: ReplicaState
    detector: DetectorState
    epoch: Epoch = Epoch(0)  # noqa: RUF009  (a NewType: no call at run time)
    phase: Phase = Phase.ASSIGNMENT
    members: tuple[NodeId, ...] = ()
    barrier: Barrier | None = None
    applied: int = 0  # PBFT log entries interpreted so far
    next_timestamp: int = 1  # our requests to PBFT, as its client
    outstanding: dict[int, tuple[Request, float]] = field(default_factory=dict)  # -> sent at
    proposed: set[Epoch] = field(default_factory=set)  # epochs we proposed a change for
    suspicions: dict[NodeId, set[NodeId]] = field(default_factory=dict)  # suspect -> by
    proofs: list[Proof] = field(default_factory=list)  # for the verification component
    transitions: list[tuple[Phase, Phase]] = field(default_factory=list)

    @property
    def f(self) -> int:
        return self.replica.config.f

    def is_phase_complete(self) -> bool:
        """The seed's question: may the coordinator move on from this phase?"""
        if self.phase is Phase.SYNCHRONIZATION:
            return self.barrier is not None and self.barrier.complete
        return self.phase is Phase.COMPUTATION


def new_coordinator(
    node: NodeId,
    keys: list[SigningKey] | tuple[bytes, ...],
    key: SigningKey,
    f: int,
    *,
    detector: PhiAccrualFailureDetector | None = None,
) -> CoordinatorState:
    """A coordinator for `node` in a cluster whose nodes hold `keys` (public keys or keys)."""
    public = tuple(k.public if isinstance(k, SigningKey) else k for k in keys)
    clients = {NodeId(i): pk for i, pk in enumerate(public)}  # every node may propose
    config = PbftConfig(replica=node, keys=public, f=f, clients=clients)
    return CoordinatorState(
        node=node,
        key=key,
        keys=public,
        replica=pbft.new_replica(config, key),
        detector=DetectorState(detector or PhiAccrualFailureDetector()),
        members=tuple(NodeId(i) for i in range(len(public))),
    )


def _transition(state: CoordinatorState, to: Phase) -> None:
    if to not in NEXT[state.phase]:
        raise PhaseTransitionFailed(f"no transition from {state.phase} to {to}")
    state.transitions.append((state.phase, to))
    state.phase = to


def _signed(state: CoordinatorState, message: Message) -> bool:
    sender = message.sender
    return 0 <= sender < len(state.keys) and verify_message(message, state.keys[sender])


def step(
    state: CoordinatorState, message: Message | Tick, now: float
) -> tuple[CoordinatorState, list[Send]]:
    """Route one input to its component and act on what the components conclude."""
    out: list[Send] = []
    match message:
        case Tick():
            _consensus(state, message, now, out)
            _resend(state, now, out)
            _, changes = failure_detector.step(state.detector, message, now)
            for change in changes:
                _on_health(state, change.node, change.health, change.phi, now, out)
        case Heartbeat():
            if _signed(state, message):
                _, changes = failure_detector.step(state.detector, message, now)
                for change in changes:
                    _on_health(state, change.node, change.health, change.phi, now, out)
        case (
            Request()
            | PrePrepare()
            | Prepare()
            | Commit()
            | CheckpointVote()
            | ViewChange()
            | NewView()
            | Status()
            | StateTransfer()
            | Evidence()
        ):
            _consensus(state, message, now, out)
        case BarrierReady():
            if state.barrier is not None and _signed(state, message):
                state.barrier = state.barrier.arrive(
                    message.sender, message.epoch, message.plan_digest
                )
                if state.barrier.complete and state.phase is Phase.SYNCHRONIZATION:
                    _transition(state, Phase.COMPUTATION)
        case Suspicion():
            if message.epoch == state.epoch and _signed(state, message):
                by = state.suspicions.setdefault(message.suspect, set())
                by.add(message.sender)
                if len(by) >= weak_quorum(state.f):  # at least one honest node suspects it
                    _propose(state, message.suspect, f"suspected by {sorted(by)}", now, out)
        case Proof():
            if message.epoch == state.epoch and _signed(state, message):
                state.proofs.append(message)
        case Reply() | Reconfigure():
            pass  # replies go to clients; reconfigurations only count once PBFT decides them
        case _:
            assert_never(message)
    return state, out


def _consensus(state: CoordinatorState, message: pbft.Input, now: float, out: list[Send]) -> None:
    evidence_before = len(state.replica.evidence)
    state.replica, sends = pbft.step(state.replica, message, now)
    out.extend(sends)
    for ev in state.replica.evidence[evidence_before:]:
        _propose(state, ev.accused, f"evidence of {ev.first.kind} equivocation", now, out)
    for pp in state.replica.executed[state.applied :]:
        if pp.request is not None:
            _apply_decision(state, pp.request)
    state.applied = len(state.replica.executed)


def _on_health(
    state: CoordinatorState, node: NodeId, health: Health, phi: float, now: float, out: list[Send]
) -> None:
    if node not in state.members or node == state.node:
        return
    if health is Health.SUSPECTED:
        suspicion = Suspicion(sender=state.node, epoch=state.epoch, suspect=node, phi=phi)
        out.append(Send(None, sign_message(suspicion, state.key)))
    elif health is Health.FAILED:
        _propose(state, node, f"failed (phi={phi:.1f})", now, out)


def propose_plan(
    state: CoordinatorState, members: tuple[NodeId, ...], reason: str, now: float
) -> list[Send]:
    """Ask PBFT to decide the next epoch's membership (e.g. the first plan, at start)."""
    out: list[Send] = []
    _submit(state, members, reason, now, out)
    return out


def _propose(
    state: CoordinatorState, remove: NodeId, reason: str, now: float, out: list[Send]
) -> None:
    if remove not in state.members or Epoch(state.epoch + 1) in state.proposed:
        return
    _submit(state, tuple(m for m in state.members if m != remove), reason, now, out)


def _submit(
    state: CoordinatorState, members: tuple[NodeId, ...], reason: str, now: float, out: list[Send]
) -> None:
    new_epoch = Epoch(state.epoch + 1)
    state.proposed.add(new_epoch)
    change = sign_message(
        Reconfigure(
            sender=state.node,
            epoch=state.epoch,
            new_epoch=new_epoch,
            members=members,
            plan_digest=plan_digest(new_epoch, members),
            reason=reason[:200],
        ),
        state.key,
    )
    request = sign_message(
        Request(
            sender=state.node,
            epoch=state.replica.config.epoch,
            timestamp=state.next_timestamp,
            operation=encode(change),
        ),
        state.key,
    )
    state.next_timestamp += 1
    state.outstanding[request.timestamp] = (request, now)
    out.append(Send(None, request))
    if state.phase is not Phase.RECONFIGURATION:
        _transition(state, Phase.RECONFIGURATION)
    _consensus(state, request, now, out)


def _resend(state: CoordinatorState, now: float, out: list[Send]) -> None:
    """Like any PBFT client, retransmit a proposal until it is decided: the primary may
    never have received it, and only its arrival there gets it ordered.
    """
    for ts, (request, sent) in list(state.outstanding.items()):
        if (request.sender, ts) in state.replica.replies:
            del state.outstanding[ts]
        elif now - sent >= RESEND_INTERVAL:
            state.outstanding[ts] = (request, now)
            out.append(Send(None, request))


def _apply_decision(state: CoordinatorState, request: Request) -> None:
    """Apply a decided operation; everyone applies the same ones in the same order."""
    try:
        change = decode(request.operation)
    except InvalidMessage:
        return  # not a coordination operation (another component's decision)
    if not isinstance(change, Reconfigure) or change.new_epoch != state.epoch + 1:
        return  # stale: a competing proposal for this epoch was decided first
    if change.sender != request.sender or not _signed(state, change):
        return  # a client may only submit its own proposals
    if not set(change.members) <= set(state.members):
        return  # epochs only remove members; joining is a separate, later protocol
    if change.plan_digest != plan_digest(change.new_epoch, change.members):
        return
    state.epoch, state.members = change.new_epoch, change.members
    state.barrier = Barrier(state.epoch, change.plan_digest, frozenset(change.members))
    state.suspicions.clear()
    for gone in set(state.detector.detector.nodes()) - set(change.members):
        state.detector.detector.forget(gone)
    _transition(state, Phase.SYNCHRONIZATION)


def mark_ready(state: CoordinatorState) -> list[Send]:
    """This node loaded its layers for the current plan: tell everyone, count ourselves."""
    if state.barrier is None or state.node not in state.barrier.expected:
        return []
    ready = sign_message(BarrierReady(state.node, state.epoch, state.barrier.digest), state.key)
    state.barrier = state.barrier.arrive(state.node, state.epoch, state.barrier.digest)
    if state.barrier.complete and state.phase is Phase.SYNCHRONIZATION:
        _transition(state, Phase.COMPUTATION)
    return [Send(None, ready)]


def next_deadline(state: CoordinatorState) -> float | None:
    times = [pbft.next_deadline(state.replica), failure_detector.next_deadline(state.detector)]
    present = [t for t in times if t is not None]
    return min(present) if present else None
