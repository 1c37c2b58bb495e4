"""Heartbeats out, heartbeats in, and each peer's health as the failure detector sees it.

Heartbeats go on the control channel from the event loop, never from the torch thread,
so a node busy computing still looks alive.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from butterfly.net.framing import Envelope
from butterfly.net.transport import Transport
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import NodeId
from butterfly.types.messages import Heartbeat

log = logging.getLogger(__name__)


class Detector(Protocol):
    def record_heartbeat(self, node: NodeId, now: float) -> None: ...

    def phi(self, node: NodeId, now: float) -> float | None: ...

    def is_suspected(self, node: NodeId, now: float) -> bool: ...

    def is_failed(self, node: NodeId, now: float) -> bool: ...


@dataclass
class PeerView:
    last_seen: float | None = None
    layers: tuple[int, ...] = ()
    requests: int = 0


class Membership:
    def __init__(
        self,
        *,
        node: NodeId,
        members: dict[NodeId, str],
        transport: Transport,
        detector: Detector,
        interval_s: float,
        local_state: Callable[[], tuple[tuple[int, ...], int]],
        on_status_change: Callable[[NodeId, str], None] = lambda n, s: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node, self.members = node, members
        self._transport, self._detector, self._interval = transport, detector, interval_s
        self._local_state, self._on_change, self._clock = local_state, on_status_change, clock
        self.peers = {n: PeerView() for n in members if n != node}
        self._last_status: dict[NodeId, str] = {}

    def on_heartbeat(self, env: Envelope) -> None:
        msg = env.msg
        if not isinstance(msg, Heartbeat):
            return
        peer = self.peers.get(NodeId(env.sender))
        if peer is None:
            return
        now = self._clock()
        self._detector.record_heartbeat(NodeId(env.sender), now)
        peer.last_seen, peer.layers, peer.requests = now, msg.layers, msg.requests

    def status(self, node: NodeId) -> str:
        if node == self.node:
            return "healthy"
        now = self._clock()
        if self.peers[node].last_seen is None:
            return "starting"
        if self._detector.is_failed(node, now):
            return "failed"
        if self._detector.is_suspected(node, now):
            return "suspected"
        return "healthy"

    def requests_of(self, node: NodeId) -> int:
        if node == self.node:
            return self._local_state()[1]
        return self.peers[node].requests

    def seconds_since(self, node: NodeId) -> float | None:
        seen = self.peers[node].last_seen if node in self.peers else self._clock()
        return None if seen is None else self._clock() - seen

    async def run(self) -> None:
        """One heartbeat loop per peer, so an unreachable peer delays nobody else's."""
        async with asyncio.TaskGroup() as tg:
            for peer in self.peers:
                tg.create_task(self._beat(peer))
            tg.create_task(self._watch())

    async def _beat(self, peer: NodeId) -> None:
        for seq in itertools.count():
            layers, requests = self._local_state()
            beat = Heartbeat(seq, self._clock(), layers, requests)
            try:
                await asyncio.wait_for(
                    self._transport.send(peer, beat, channel="control"), self._interval
                )
            except (ButterflyError, TimeoutError) as e:
                log.debug("heartbeat to node %s failed: %s", peer, e)
            await asyncio.sleep(self._interval)

    async def _watch(self) -> None:
        while True:
            for peer in self.peers:
                status = self.status(peer)
                if self._last_status.get(peer) != status:
                    self._last_status[peer] = status
                    log.info("node %s sees node %s as %s", self.node, peer, status)
                    self._on_change(peer, status)
            await asyncio.sleep(self._interval)
