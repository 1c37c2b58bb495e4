"""Proof of misbehaviour: two messages one node signed that no honest node would sign.

A primary that sends two different pre-prepares for one (view, sequence number), or any
replica that votes for two digests in one slot, has signed both; since signatures cannot
be forged (DESIGN.md section 3) the pair convicts it without trusting the reporter. Such
evidence is what the coordinator later puts through PBFT to evict the node.
"""

from __future__ import annotations

from butterfly.protocol.pbft_state import ReplicaState, Send, sign
from butterfly.protocol.quorum import live_members
from butterfly.protocol.sign import verify_message
from butterfly.types.ids import NodeId
from butterfly.types.wire.agreement import (
    CheckpointVote,
    Commit,
    Conflicting,
    Evidence,
    Prepare,
    PrePrepare,
)


def slot_of(message: Conflicting) -> tuple[object, ...]:
    """The slot a message votes in; two messages of one signer in one slot must agree."""
    match message:
        case PrePrepare():
            return ("pre_prepare", message.view, message.seq)
        case Prepare():
            return ("prepare", message.view, message.seq)
        case Commit():
            return ("commit", message.view, message.seq)
        case CheckpointVote():
            return ("checkpoint", message.seq)


def conflicts(first: Conflicting, second: Conflicting) -> bool:
    """Same signer, same epoch and slot, different digests."""
    return (
        type(first) is type(second)
        and first.sender == second.sender
        and first.epoch == second.epoch
        and slot_of(first) == slot_of(second)
        and first.digest != second.digest
    )


def valid_evidence(evidence: Evidence, keys: tuple[bytes, ...]) -> bool:
    """Checks a peer's evidence on its own merits: the reporter need not be trusted."""
    first, second, accused = evidence.first, evidence.second, evidence.accused
    if not 0 <= accused < len(keys) or not keys[accused]:
        return False
    if first.sender != accused or not conflicts(first, second):
        return False
    members = live_members(keys)
    if isinstance(first, PrePrepare) and members[first.view % len(members)] != accused:
        return False
    return verify_message(first, keys[accused]) and verify_message(second, keys[accused])


def _strip(message: Conflicting) -> Conflicting:
    return message.header() if isinstance(message, PrePrepare) else message


def record(state: ReplicaState, first: Conflicting, second: Conflicting, out: list[Send]) -> None:
    """Keep and broadcast evidence once per (accused, slot); both messages must be verified."""
    key = (first.sender, *slot_of(first))
    if key in state.evidence_keys:
        return
    evidence = sign(
        state,
        Evidence(
            sender=state.me,
            epoch=state.config.epoch,
            accused=first.sender,
            first=_strip(first),
            second=_strip(second),
        ),
    )
    state.evidence_keys.add(key)
    state.evidence.append(evidence)
    out.append(Send(None, evidence))


def accept_evidence(state: ReplicaState, evidence: Evidence) -> None:
    """Store a peer's evidence after checking it; no rebroadcast, its author did that."""
    if not valid_evidence(evidence, state.config.keys):
        return
    key = (evidence.accused, *slot_of(evidence.first))
    if key not in state.evidence_keys:
        state.evidence_keys.add(key)
        state.evidence.append(evidence)


def embedded_header(state: ReplicaState, prepare: Prepare) -> PrePrepare:
    """The primary's pre-prepare header a prepare quotes, rebuilt for verification."""
    return PrePrepare(
        sender=state.config.primary_of(prepare.view),
        epoch=prepare.epoch,
        view=prepare.view,
        seq=prepare.seq,
        digest=prepare.digest,
        signature=prepare.pp_signature,
    )


def known_header(state: ReplicaState, view: int, seq: int) -> PrePrepare | None:
    """The pre-prepare this replica accepted for (view, seq), even if since collected."""
    slot = state.log.get(seq)
    if slot is not None and view in slot.pre_prepares:
        return slot.pre_prepares[view]
    return state.orphans.get((view, seq))


def check_header(state: ReplicaState, header: PrePrepare, out: list[Send]) -> None:
    """Compare a pre-prepare seen anywhere (relayed, quoted, in a view change) with ours."""
    mine = known_header(state, header.view, header.seq)
    if mine is None or mine.digest == header.digest:
        return
    lead: NodeId = state.config.primary_of(header.view)
    if header.sender != lead or header.epoch != state.config.epoch:
        return
    if verify_message(header, state.config.keys[lead]):
        record(state, mine, header, out)


def check_prepare(state: ReplicaState, prepare: Prepare, out: list[Send]) -> None:
    """A prepare for another digest quotes the primary's signature: maybe equivocation."""
    mine = known_header(state, prepare.view, prepare.seq)
    if mine is not None and mine.digest != prepare.digest:
        check_header(state, embedded_header(state, prepare), out)
