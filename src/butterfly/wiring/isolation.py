"""Whether the acting gateway may take tasks: it may not once the members it lost could
agree a takeover without it (`control.gateway_role.cut_off`), for it may have been
replaced already.

The detector's verdict is checked over the transport first: a ping round, so the refusal
follows the detector by up to `PING_S`, longer while a dial to a silent host times out.
Heartbeats are datagrams, and a firewall may drop them on the way in only: the peers then
still hear this gateway and veto any takeover, and refusing would stop the cluster rather
than protect it. A member that answers a ping is therefore not counted lost. If datagrams
are lost both ways while connections work, the peers may take over all the same; the old
gateway then accepts tasks until the agreed log, which reaches it over those connections,
names its successor, and the stage nodes refuse its steps meanwhile (they take steps from
the acting gateway only): such tasks fail, they never run twice.

A gateway that refuses steps down: it sends no heartbeat while it refuses (`silence`),
so that its peers see it fail and agree a successor. Cut off on the way in only (it
hears no one, no connection to it completes, and its heartbeats still go out), it
refused every task and its peers, hearing it, vetoed any takeover: the cluster served
nothing for as long as the cut lasted (a review). It beats again once it hears a quorum
or reaches one, and learns from the agreed log whether it was replaced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from butterfly.control.gateway_role import GatewayRole
from butterfly.metrics.events import Emit, GatewayRefusing
from butterfly.net.transport import Transport
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import NodeId
from butterfly.types.wire.data import Ping

log = logging.getLogger(__name__)

PING_S = 1.0
"""How long the gateway waits for a member its detector lost to answer a ping."""
LOOK_S = 0.05
"""How often the acting gateway looks at its detector's verdict."""


class IsolationWatch:
    """`reason`: why the acting gateway takes no task now, or None; kept by `run`."""

    def __init__(
        self,
        *,
        node: NodeId,
        members: Collection[NodeId],
        role: GatewayRole,
        f: Callable[[], int],
        transport: Transport,
        emit: Emit,
        silence: Callable[[bool], None],
    ) -> None:
        """`members`: the roster's, live; `f`: `byzantine.f` as the config has it now;
        `silence`: stops or resumes this node's heartbeats (`Membership.silence`)."""
        self._node, self._members, self._role, self._f = node, members, role, f
        self._transport, self._emit, self._silence = transport, emit, silence
        self.reason: str | None = None

    async def run(self) -> None:
        try:
            while True:
                self._set(await self._verdict())
                await asyncio.sleep(LOOK_S)
        finally:
            self._set(None)

    async def _verdict(self) -> str | None:
        why = self._role.cut_off(self._node, self._members, self._f())
        if why is None:
            return None
        lost = [n for n in self._members if n != self._node and self._role.failed(n)]
        answered = await asyncio.gather(*(self._answers(n) for n in lost))
        reachable = [n for n, ok in zip(lost, answered, strict=True) if ok]
        return self._role.cut_off(self._node, self._members, self._f(), reachable)

    def _set(self, why: str | None) -> None:
        if why is not None and self.reason is None:
            log.warning("%s: taking no task, and stepping down (no heartbeats)", why)
            self._emit(GatewayRefusing(True))
            self._silence(True)
        elif why is None and self.reason is not None:
            log.info("node %s reaches a quorum again: taking tasks", self._node)
            self._emit(GatewayRefusing(False))
            self._silence(False)
        self.reason = why

    async def _answers(self, peer: NodeId) -> bool:
        try:
            await self._transport.ask(peer, Ping(0), timeout=PING_S, channel="control")
        except ButterflyError:
            return False
        return True
