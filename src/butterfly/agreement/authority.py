"""Who may put each kind of command into the agreed log.

PBFT orders whatever a known client signed; every member is such a client (it signs with
its node key). Without a rule per command kind, any member could order a plan, evict an
honest node, pre-empt its own eviction or change the configuration. The rule:

    command         authorized proposer        checked by
    new_plan        the gateway                every replica: the primary does not order
    evict_node      the gateway (never of      it, backups do not prepare a pre-prepare
                    itself)                    carrying it, and every node skips it at
    config_update   the gateway (which takes   execution (the driver), so a lying
    config_abort    it only from an API        primary cannot force it through
                    request with a valid
                    token when api.tokens is
                    set)

`authorized` is a pure function of the ordered request (command and signer) and the
gateway's id, so every honest replica decides alike; `admission` adapts it to the PBFT
replica's `PbftConfig.authorize` hook. The API token itself is checked at the gateway's
HTTP layer before it proposes (`api.guards`): replicas cannot see it, they trust the
gateway, which the clients trust already (it samples their answers).
"""

from __future__ import annotations

from butterfly.protocol.pbft_state import Authorize
from butterfly.types.errors import CoordinationError
from butterfly.types.ids import GATEWAY, NodeId
from butterfly.types.wire.agreement import Request
from butterfly.types.wire.commands import (
    Command,
    ConfigAbort,
    ConfigUpdate,
    EvictNode,
    InvalidCommand,
    NewPlan,
    decode_command,
)


class UnauthorizedCommand(CoordinationError):
    """This node may not propose that command: no honest replica would order it."""


def authorized(command: Command, proposer: NodeId, gateway: NodeId = GATEWAY) -> str | None:
    """Why `proposer` may not order `command` (None: it may).

    >>> authorized(EvictNode(NodeId(2), "lied"), NodeId(0))
    >>> authorized(EvictNode(NodeId(2), "crashed"), NodeId(2))
    'evict_node comes from the gateway (node 0) only, not node 2'
    """
    if proposer != gateway:
        return f"{command.kind} comes from the gateway (node {gateway}) only, not node {proposer}"
    match command:
        case EvictNode(node=node) if node == gateway:
            return "the gateway cannot be evicted: its role does not move to another node"
        case NewPlan() | EvictNode() | ConfigUpdate() | ConfigAbort():
            return None


def request_refusal(request: Request, gateway: NodeId = GATEWAY) -> str | None:
    """Why a signed agreement request must not be ordered or executed (None: it may): an
    operation that is not a command is refused as well, as no honest node proposes one."""
    try:
        command = decode_command(request.operation)
    except InvalidCommand as e:
        return f"not a command: {e}"
    return authorized(command, request.sender, gateway)


def admission(gateway: NodeId = GATEWAY) -> Authorize:
    """The replica hook (`PbftConfig.authorize`) for a node whose gateway is `gateway`."""

    def authorize(request: Request) -> str | None:
        return request_refusal(request, gateway)

    return authorize


__all__ = ["UnauthorizedCommand", "admission", "authorized", "request_refusal"]
