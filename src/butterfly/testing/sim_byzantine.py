"""Byzantine replica behaviours for the PBFT simulation, by composition.

A liar runs the honest state machine (so it knows what honest would send) and rewrites
its outbound messages, signing the lies with its own key. It cannot sign as anyone else,
exactly as in the fault model of DESIGN.md section 3.
"""

from __future__ import annotations

import enum
import random
from dataclasses import replace

from butterfly.protocol.messages import (
    CheckpointVote,
    Commit,
    Message,
    Prepare,
    PrePrepare,
    Reply,
    Status,
    request_digest,
    sign_message,
)
from butterfly.protocol.pbft_state import ReplicaState, Send
from butterfly.types.ids import NodeId


class Behaviour(enum.StrEnum):
    EQUIVOCATE = "equivocate"  # different pre-prepares / votes to different peers
    WRONG_VOTES = "wrong-votes"  # votes and checkpoints for digests nobody proposed
    SILENT = "silent"  # receives everything, sends nothing
    TWINS = "twins"  # two honest replicas sharing one identity and key
    FORK = "fork"  # liars collude: even peers are told one value, odd peers another


Board = dict[tuple[int, int], tuple[PrePrepare, PrePrepare]]
"""What colluding liars share: for (view, seq), the pre-prepares shown to each side."""


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
    """Show even peers one value and odd peers another, with the other liars' help."""
    if isinstance(message, PrePrepare) and message.request is not None:
        choices = [r for r in state.pending.values() if r != message.request]
        if not choices:
            return [(None, message)]
        alt = choices[0]
        other = sign_message(replace(message, request=alt, digest=request_digest(alt)), state.key)
        board[(message.view, message.seq)] = (message, other)
        return [(p, message if p % 2 == 0 else other) for p in peers]
    if isinstance(message, Prepare | Commit) and (message.view, message.seq) in board:
        sides = board[(message.view, message.seq)]
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
