"""Who may put each kind of command into the agreed log.

PBFT orders whatever a known client signed; every member is such a client (it signs with
its node key). Without a rule per command kind, any member could order a plan, evict an
honest node, pre-empt its own eviction or change the configuration. The rule:

    command         authorized proposer        checked by
    new_plan        the gateway                every replica: the primary does not order
    resume_node                                it, backups do not prepare a pre-prepare
    evict_node      the gateway (never of      carrying it, and every node skips it at
    suspend_node    itself)                    execution (the driver), so a lying
    config_update   the gateway (which takes   primary cannot force it through
    config_abort    it only from an API
                    request with a valid
                    token when api.tokens is
                    set)
    take_over       the successor of a failed  the same, with a rule the node's gateway
                    gateway, for itself        role gives (`control.gateway_role`): at
                                               execution the agreed state alone; before
                                               preparing, also the replica's own failure
                                               detector (it must see the gateway failed)

`authorized` is a pure function of the ordered request (command and signer) and the
acting gateway's id as the agreed log left it, so every honest replica decides alike;
`admission` adapts it to the PBFT replica's `PbftConfig.authorize` hook (and, with the
execution-time takeover rule, to the driver's check at execution). The API token itself
is checked at the gateway's HTTP layer before it proposes (`api.guards`): replicas
cannot see it, they trust the gateway, which the clients trust already (it samples
their answers).
"""

from __future__ import annotations

from collections.abc import Callable

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
    ResumeNode,
    SuspendNode,
    TakeOver,
    decode_command,
)

TakeoverRule = Callable[[TakeOver, NodeId], str | None]
"""Why a takeover by a proposer must not be ordered (`control.gateway_role`)."""


class UnauthorizedCommand(CoordinationError):
    """This node may not propose that command: no honest replica would order it."""


def authorized(
    command: Command,
    proposer: NodeId,
    gateway: NodeId = GATEWAY,
    takeover: TakeoverRule | None = None,
) -> str | None:
    """Why `proposer` may not order `command` (None: it may). `gateway`: the acting one;
    `takeover`: the rule for `TakeOver` (none: the role cannot move here).

    >>> authorized(EvictNode(NodeId(2), "lied"), NodeId(0))
    >>> authorized(EvictNode(NodeId(2), "crashed"), NodeId(2))
    'evict_node comes from the gateway (node 0) only, not node 2'
    """
    if isinstance(command, TakeOver):
        if takeover is None:
            return "the gateway role cannot move in this cluster"
        return takeover(command, proposer)
    if proposer != gateway:
        return f"{command.kind} comes from the gateway (node {gateway}) only, not node {proposer}"
    match command:
        case EvictNode(node=node) | SuspendNode(node=node) if node == gateway:
            return f"the acting gateway cannot be put out ({command.kind}): its successor "
            "takes over if it fails"
        case (
            NewPlan() | EvictNode() | SuspendNode() | ResumeNode() | ConfigUpdate() | ConfigAbort()
        ):
            return None


def request_refusal(
    request: Request, gateway: NodeId = GATEWAY, takeover: TakeoverRule | None = None
) -> str | None:
    """Why a signed agreement request must not be ordered or executed (None: it may): an
    operation that is not a command is refused as well, as no honest node proposes one."""
    try:
        command = decode_command(request.operation)
    except InvalidCommand as e:
        return f"not a command: {e}"
    return authorized(command, request.sender, gateway, takeover)


def admission(
    gateway: NodeId | Callable[[], NodeId] = GATEWAY, takeover: TakeoverRule | None = None
) -> Authorize:
    """The replica hook (`PbftConfig.authorize`) for a node whose acting gateway is
    `gateway` (a fixed node, or a lookup of the agreed one, read on every request)."""
    acting = gateway if callable(gateway) else (lambda: gateway)

    def authorize(request: Request) -> str | None:
        return request_refusal(request, acting(), takeover)

    return authorize


__all__ = ["TakeoverRule", "UnauthorizedCommand", "admission", "authorized", "request_refusal"]
