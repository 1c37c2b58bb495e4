"""Which node acts as the gateway: agreed state, moved by agreement like a PBFT view.

The gateway-capable nodes (`cluster.gateways`, in order) may each serve the API; one acts
at a time. The first acts from the start (term 0). When the acting one fails, its
successor, the next capable node after it (in cyclic order) that is neither failed nor
evicted, proposes `TakeOver(itself, term + 1)`; once the agreement has executed it, every
node treats that node as the gateway (whom it takes steps, plans and config votes from).

Two checks guard the command, as view changes are guarded:

- at execution, on every node, a pure function of the agreed log (`takeover_refusal`):
  the proposer names itself, is gateway-capable, not acting, not evicted, and the term
  is the next one. Every honest node decides alike, so they all agree who acts.
- before taking it up, each replica also asks its *own* failure detector (`veto`, the
  agreement's `PbftConfig.veto`): it helps order a takeover only if it, too, sees the
  acting gateway failed and the proposer as its successor. A node that merely claims the
  gateway died (a liar, or one cut off alone) cannot gather 2f+1 such votes while the
  gateway's heartbeats reach the others. A replica that vetoes still executes the
  takeover once 2f+1 others committed it (a lagging or restarted one catches up).

A gateway that comes back after being replaced is not acting: it learns so from the
agreed log (its peers relay what it missed) and stops serving (`wiring.gateway`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Collection, Sequence

from butterfly.protocol.quorum import quorum
from butterfly.types.ids import NodeId
from butterfly.types.wire.agreement import Request
from butterfly.types.wire.commands import InvalidCommand, TakeOver, decode_command


def successor(
    gateways: Sequence[NodeId],
    acting: NodeId,
    failed: Callable[[NodeId], bool],
    evicted: Collection[NodeId],
) -> NodeId | None:
    """The next gateway-capable node after `acting`, in order and wrapping around, that
    is neither failed nor evicted (None: no such node, or `acting` is not failed).

    >>> failed = {0, 1}.__contains__
    >>> successor([0, 1, 2], 0, failed, ())
    2
    >>> successor([0, 1, 2], 0, lambda n: False, ())
    """
    if not failed(acting) and acting not in evicted:
        return None
    start = gateways.index(acting) + 1 if acting in gateways else 0
    for node in (*gateways[start:], *gateways[:start]):
        if node != acting and not failed(node) and node not in evicted:
            return node
    return None


def takeover_refusal(
    command: TakeOver,
    proposer: NodeId,
    *,
    gateways: Sequence[NodeId],
    acting: NodeId,
    term: int,
    evicted: Collection[NodeId],
) -> str | None:
    """Why the agreed log must not move the role with `command` (None: it may). A pure
    function of the agreed state, so every node executes a takeover alike.

    >>> takeover_refusal(TakeOver(1, 1), 1, gateways=(0, 1), acting=0, term=0, evicted=())
    >>> takeover_refusal(TakeOver(2, 1), 2, gateways=(0, 1), acting=0, term=0, evicted=())
    'node 2 is not gateway-capable (cluster.gateways: [0, 1])'
    """
    if command.gateway != proposer:
        return f"node {proposer} proposed a takeover for node {command.gateway}"
    if proposer not in gateways:
        return f"node {proposer} is not gateway-capable (cluster.gateways: {list(gateways)})"
    if proposer == acting:
        return f"node {proposer} is the acting gateway already"
    if proposer in evicted:
        return f"node {proposer} was evicted"
    if command.term != term + 1:
        return f"takeover for term {command.term}, but the next term is {term + 1}"
    return None


def cut_off(
    me: NodeId,
    members: Collection[NodeId],
    failed: Callable[[NodeId], bool],
    evicted: Collection[NodeId],
    f: int,
) -> str | None:
    """Why the acting gateway `me` must accept no task now (None: it may): the members
    it has lost could agree a takeover without it.

    A takeover needs a quorum of the agreement's members whose own detectors see the
    gateway failed (`GatewayRole.veto`); those that still hear it decline. Detection
    being symmetric, the members this gateway does not hear are the ones that may not
    hear it. An evicted member stays in the agreement (it keeps its key) and, a proven
    liar, may vote for any takeover: it counts as lost. Once the lost make a quorum,
    this gateway may have been replaced already, and a task it took could run on a
    cluster that has moved on, or twice. Refused at once, a client tries the next
    gateway (`cli.gateways`). Heartbeats lost on the way in only are not a cut: the
    peers still hear it and veto any takeover, so `wiring.isolation` counts a member as
    lost only if it does not answer a ping either (`GatewayRole.cut_off`'s `reachable`;
    what that leaves open is in that module's docstring).

    >>> cut_off(0, (0, 1, 2, 3), {3}.__contains__, (), f=1)
    >>> print(cut_off(0, (0, 1, 2, 3), {1, 2, 3}.__contains__, (), f=1))  # doctest: +ELLIPSIS
    node 0 has lost 3 of the 4 members ([1, 2, 3]), a quorum (3) that may agree a takeover ...
    >>> cut_off(0, (0, 1), {1}.__contains__, (), f=0)  # one node is not a quorum of two
    """
    lost = sorted(n for n in members if n != me and (failed(n) or n in evicted))
    need = quorum(len(members), f)
    if len(lost) < need:
        return None
    return (
        f"node {me} has lost {len(lost)} of the {len(members)} members ({lost}), "
        f"a quorum ({need}) that may agree a takeover without it"
    )


class GatewayRole:
    """The acting gateway as this node executed the agreed log (`execute`), and the two
    checks on a takeover (module docstring)."""

    def __init__(
        self,
        *,
        gateways: Sequence[NodeId],
        status: Callable[[NodeId], str],
        evicted: Callable[[], Collection[NodeId]],
        never_heard_for: Callable[[NodeId], float | None] = lambda node: None,
        never_heard_s: float = math.inf,
    ) -> None:
        """`status`: this node's failure detector; `evicted`: the agreed evictions;
        `never_heard_for`: how long a member has been watched and never heard (None:
        heard from); `never_heard_s` (`coordination.never_heard_s`): after how long such
        a member counts as failed. Nodes started together are heard within seconds (4 nodes
        on one 2-core AMD EPYC host are healthy in about 7 s, `bench/startup.py`), while a first
        gateway that never comes up would otherwise stay "starting", and acting, for
        good: nobody would take over."""
        self.gateways = tuple(gateways)
        self._status, self._evicted = status, evicted
        self._never_heard_for, self._never_heard_s = never_heard_for, never_heard_s
        self.acting: NodeId = self.gateways[0]
        self.term = 0
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[NodeId, int], None]] = []

    def gateway(self) -> NodeId:
        """The acting gateway now: whom the entitlement rules judge peers by."""
        return self.acting

    def capable(self, node: NodeId) -> bool:
        return node in self.gateways

    def follow(self, gateways: Sequence[NodeId]) -> None:
        """The gateway-capable nodes after an agreed membership change (a standby gateway
        removed); the acting one is never removed (`config.roster.roster_change`)."""
        if self.acting not in gateways:
            raise ValueError(f"the acting gateway (node {self.acting}) cannot leave {gateways}")
        self.gateways = tuple(gateways)

    def failed(self, node: NodeId) -> bool:
        """Failed as the detector sees it, or never heard from in `never_heard_s`."""
        status = self._status(node)
        if status == "starting":
            silent = self._never_heard_for(node)
            return silent is not None and silent >= self._never_heard_s
        return status == "failed"

    def successor(self) -> NodeId | None:
        """Who should take over, as this node's failure detector sees it."""
        return successor(self.gateways, self.acting, self.failed, self._evicted())

    def cut_off(
        self,
        me: NodeId,
        members: Collection[NodeId],
        f: int,
        reachable: Collection[NodeId] = (),
    ) -> str | None:
        """`cut_off` as this node's detector and the agreed evictions have it, but for the
        members just `reachable` over the transport (heartbeats lost one way only)."""
        return cut_off(
            me, members, lambda n: self.failed(n) and n not in reachable, self._evicted(), f
        )

    def on_change(self, listener: Callable[[NodeId, int], None]) -> None:
        """Call `listener(acting, term)` whenever an agreed takeover moves the role."""
        self._listeners.append(listener)

    async def changed(self) -> None:
        """Return at the next agreed takeover."""
        await self._changed.wait()

    # --- the agreement's checks ---------------------------------------------------------

    def refusal(self, command: TakeOver, proposer: NodeId) -> str | None:
        """At execution: the agreed state alone decides."""
        return takeover_refusal(
            command,
            proposer,
            gateways=self.gateways,
            acting=self.acting,
            term=self.term,
            evicted=self._evicted(),
        )

    def veto(self, request: Request) -> str | None:
        """Why this replica declines to order or prepare `request`: a takeover its own
        failure detector does not support (the acting gateway alive, or another node its
        successor). Other commands are not its business (None)."""
        try:
            command = decode_command(request.operation)
        except InvalidCommand:
            return None  # refused by the agreement's rule anyway
        if not isinstance(command, TakeOver):
            return None
        proposer = request.sender
        if not self.failed(self.acting) and self.acting not in self._evicted():
            return f"the acting gateway (node {self.acting}) is not failed as this node sees it"
        if self.successor() != proposer:
            return f"node {proposer} is not the acting gateway's successor as this node sees it"
        return None

    # --- every node, in agreement order ---------------------------------------------------

    def execute(self, command: TakeOver) -> None:
        """The driver executes only a takeover its proposer signed for itself
        (`agreement.authority`), so `command.gateway` is the proposer."""
        if self.refusal(command, command.gateway) is not None:
            return  # a second takeover of one term (a retry): the first one decided
        self.acting, self.term = command.gateway, command.term
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self._listeners:
            listener(self.acting, self.term)

    def restore(self, acting: NodeId, term: int) -> None:
        """What a state snapshot says the agreed log left (`agreed_state`): a node that
        could not replay the log takes the role's holder and term from f+1 peers."""
        if (acting, term) == (self.acting, self.term) or term < self.term:
            return
        self.acting, self.term = acting, term
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self._listeners:
            listener(self.acting, self.term)


__all__ = ["GatewayRole", "successor", "takeover_refusal"]
