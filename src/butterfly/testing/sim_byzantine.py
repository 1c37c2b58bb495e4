"""Byzantine replica behaviours for the PBFT simulation, by composition.

A liar runs the honest state machine (so it knows what honest would send) and rewrites
its outbound messages, signing the lies with its own key. It cannot sign as anyone else,
exactly as in the fault model of DESIGN.md section 3.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field, replace

from butterfly.protocol.pbft_state import ReplicaState, Send
from butterfly.protocol.sign import sign_message
from butterfly.types.ids import NodeId
from butterfly.types.wire.agreement import (
    CheckpointVote,
    Commit,
    Message,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    Status,
    request_digest,
)


class Behaviour(enum.StrEnum):
    EQUIVOCATE = "equivocate"  # different pre-prepares / votes to different peers
    WRONG_VOTES = "wrong-votes"  # votes and checkpoints for digests nobody proposed
    SILENT = "silent"  # receives everything, sends nothing
    TWINS = "twins"  # two honest replicas sharing one identity and key
    FORK = "fork"  # liars collude: even peers are told one value, odd peers another


@dataclass
class Board:
    """What colluding liars share: per (view, seq) the pre-prepares shown to each side
    (even peers, odd peers), and a pre-prepare held back to swap with the next one.
    """

    sides: dict[tuple[int, int], tuple[PrePrepare, PrePrepare]] = field(default_factory=dict)
    held: dict[int, PrePrepare] = field(default_factory=dict)


Routed = tuple[NodeId | None, Message]


def rewrite(
    behaviour: Behaviour,
    state: ReplicaState,
    sends: list[Send],
    peers: list[NodeId],
    rng: random.Random,
    board: Board,
) -> list[Routed]:
    """What a liar actually sends instead of `sends`; `None` as target means all peers."""
    match behaviour:
        case Behaviour.SILENT:
            return []
        case Behaviour.TWINS:
            return [(s.to, s.message) for s in sends]
        case Behaviour.WRONG_VOTES:
            return [(s.to, _wrong(state, s.message, rng)) for s in sends]
        case Behaviour.EQUIVOCATE:
            out: list[Routed] = []
            for s in sends:
                if s.to is None:
                    out.extend(_equivocate(state, s.message, peers, rng))
                else:
                    out.append((s.to, s.message))
            return out
        case Behaviour.FORK:
            routed: list[Routed] = []
            for s in sends:
                if s.to is None:
                    routed.extend(_fork(state, s.message, peers, board))
                else:
                    routed.append((s.to, s.message))
            return routed


def _fork(state: ReplicaState, message: Message, peers: list[NodeId], board: Board) -> list[Routed]:
    """Show even peers one history and odd peers another, with the other liars' votes."""
    even = [p for p in peers if p % 2 == 0]
    odd = [p for p in peers if p % 2 == 1]
    if isinstance(message, PrePrepare) and message.request is not None:
        held = board.held.pop(message.view, None)
        if held is None:
            choices = [r for r in state.pending.values() if r != message.request]
            if not choices:  # hold it back: the next request gets swapped with it
                board.held[message.view] = message
                return _to(even, message)
            other = _with_request(state, message, choices[0])
            board.sides[(message.view, message.seq)] = (message, other)
            return _to(even, message) + _to(odd, other)
        first = _with_request(state, held, message.request)  # odd peers: swapped order
        second = _with_request(state, message, held.request)
        board.sides[(held.view, held.seq)] = (held, first)
        board.sides[(message.view, message.seq)] = (message, second)
        return _to(even, message) + _to(odd, first) + _to(odd, second)
    if isinstance(message, Prepare | Commit) and (message.view, message.seq) in board.sides:
        sides = board.sides[(message.view, message.seq)]
        out: list[Routed] = []
        for p in peers:
            pp = sides[p % 2]
            vote: Message
            if isinstance(message, Prepare):
                vote = replace(message, digest=pp.digest, pp_signature=pp.signature)
            else:
                vote = replace(message, digest=pp.digest)
            out.append((p, sign_message(vote, state.key)))
        return out
    return [(None, message)]


def _to(peers: list[NodeId], message: Message) -> list[Routed]:
    return [(p, message) for p in peers]


def _with_request(state: ReplicaState, pp: PrePrepare, request: Request | None) -> PrePrepare:
    return sign_message(replace(pp, request=request, digest=request_digest(request)), state.key)


def _random_digest(rng: random.Random) -> bytes:
    return rng.getrandbits(256).to_bytes(32, "big")


def _wrong(state: ReplicaState, message: Message, rng: random.Random) -> Message:
    if isinstance(message, Prepare | Commit | CheckpointVote | Reply):
        return sign_message(replace(message, digest=_random_digest(rng)), state.key)
    if isinstance(message, Status):
        return sign_message(replace(message, executed_digest=_random_digest(rng)), state.key)
    return message


def _equivocate(
    state: ReplicaState, message: Message, peers: list[NodeId], rng: random.Random
) -> list[Routed]:
    """Split the peers in two and tell each half something different."""
    half = set(rng.sample(peers, len(peers) // 2 or 1))
    other: Message | None = None
    if isinstance(message, PrePrepare) and message.request is not None:
        choices = [r for r in state.pending.values() if r != message.request]
        if choices:
            alt = rng.choice(choices)
            other = sign_message(
                replace(message, request=alt, digest=request_digest(alt)), state.key
            )
    elif isinstance(message, Prepare | Commit):
        other = sign_message(replace(message, digest=_random_digest(rng)), state.key)
    if other is None:
        return [(None, message)]
    return [(p, message if p in half else other) for p in peers]
