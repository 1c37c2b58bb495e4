"""The operations the cluster agrees on, one frozen tagged type each.

A command is what a PBFT request carries (its `operation` bytes): every node executes the
same commands in the same order, so each must be decoded identically everywhere and
refused identically when malformed. The one codec (`wire.codec`) checks a command's map
like any message's: exactly the class's fields, each of its declared type; anything else
is `InvalidCommand`, never a crash (a Byzantine client may order garbage).

To add a command kind: declare a frozen dataclass with a unique `kind` and add it to
`Command` and `COMMANDS`.

    kind            effect when executed
    config_update   apply an agreed config proposal at config sequence `seq` (seed 002)
    config_abort    a timed-out proposal must not apply if it has not yet
    evict_node      remove a node proven faulty (evidence) from the membership
    suspend_node    a node that left its work unanswered is out of the plans for a while
    resume_node     a suspended node was taken back although no plan named it
    new_plan        the stage plan of an epoch: flat (node, start, end) triples of the
                    chain, and of the replicas (auditors and standbys)
    take_over       a gateway-capable node becomes the acting gateway for `term`
                    (proposed by that node when the acting one failed; control.gateway_role)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from butterfly.types.errors import InvalidMessage
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.base import PROTOCOL_VERSION, Text
from butterfly.types.wire.codec import Codec

MAX_COMMAND_BYTES = 60 * 1024
"""A PBFT request's operation holds at most 64 KiB; keep clear of it."""


class InvalidCommand(InvalidMessage):
    """An ordered operation that is not a well-formed command; every node skips it."""


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    """COMMIT of a config proposal (`proposal`: its canonical JSON bytes).

    `vote_nodes`, `vote_seqs` and `vote_signatures` are the 2f+1 signed PREPARE OKs (node,
    the last config seq it had applied, its signature); `seq` must be one more than the
    highest of those, so every node activates the change at the same config sequence.
    `nonce` names this attempt, so an abort cancels it and not a later retry.
    """

    kind: ClassVar[str] = "config_update"
    proposal: bytes
    seq: int
    nonce: int
    vote_nodes: tuple[NodeId, ...]
    vote_seqs: tuple[int, ...]
    vote_signatures: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ConfigAbort:
    """Roll back an update attempt whose commit timed out, unless it already applied: of the
    two, whichever the agreement orders first decides, on every node alike."""

    kind: ClassVar[str] = "config_abort"
    digest: str
    nonce: int


@dataclass(frozen=True, slots=True)
class EvictNode:
    kind: ClassVar[str] = "evict_node"
    node: NodeId
    reason: Text


@dataclass(frozen=True, slots=True)
class SuspendNode:
    """The acting gateway put `node` out of the plans for its `strikes`-th suspension in
    a row: unanswered work proves no lie, so it is taken back after
    `control.policy.suspension_s(strikes)`. Agreed so that a successor keeps it out too,
    its doubling with it: kept in one gateway's memory, a takeover took a withholding
    node straight back (a review). Until a later agreed plan gives the node layers, the
    suspension runs, whatever any clock says (`AgreedPlans.suspended`)."""

    kind: ClassVar[str] = "suspend_node"
    node: NodeId
    strikes: int
    reason: Text


@dataclass(frozen=True, slots=True)
class ResumeNode:
    """The acting gateway took the suspended `node` back without an agreed plan giving it
    layers (every range had its holders, so the plan did not change): its suspension is
    over on every node. Without it the agreed log kept the node suspended, and a gateway
    that took over later suspended the honest node again for a whole period (a review)."""

    kind: ClassVar[str] = "resume_node"
    node: NodeId


@dataclass(frozen=True, slots=True)
class NewPlan:
    kind: ClassVar[str] = "new_plan"
    epoch: Epoch
    stages: tuple[int, ...]  # (node, start, end) triples, half-open layer ranges
    replicas: tuple[int, ...] = ()  # the same, for further holders of the chain's ranges


@dataclass(frozen=True, slots=True)
class TakeOver:
    """`gateway` acts as the gateway from now on, in gateway term `term` (one more than
    the term it replaces): the role moves like a PBFT view, by agreement, never by one
    node's own view of who is alive."""

    kind: ClassVar[str] = "take_over"
    gateway: NodeId
    term: int


Command = ConfigUpdate | ConfigAbort | EvictNode | SuspendNode | ResumeNode | NewPlan | TakeOver
COMMANDS: tuple[type[Command], ...] = (
    ConfigUpdate,
    ConfigAbort,
    EvictNode,
    SuspendNode,
    ResumeNode,
    NewPlan,
    TakeOver,
)

_CODEC = Codec({c.kind: c for c in COMMANDS}, version=PROTOCOL_VERSION, error=InvalidCommand)


def encode_command(command: Command) -> bytes:
    data = _CODEC.encode(command)
    if len(data) > MAX_COMMAND_BYTES:
        raise InvalidCommand(f"{command.kind} is {len(data)} bytes, over {MAX_COMMAND_BYTES}")
    return data


def decode_command(data: bytes) -> Command:
    """Parse an ordered operation; raises `InvalidCommand` naming what was wrong."""
    command: Command = _CODEC.decode(data, max_bytes=MAX_COMMAND_BYTES)
    return command


__all__ = [
    "COMMANDS",
    "Command",
    "ConfigAbort",
    "ConfigUpdate",
    "EvictNode",
    "InvalidCommand",
    "NewPlan",
    "ResumeNode",
    "SuspendNode",
    "TakeOver",
    "decode_command",
    "encode_command",
]
