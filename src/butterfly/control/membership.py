"""Each peer's health as the failure detector sees it, from heartbeats (control.heartbeats).

Heartbeats arrive on the heartbeat link's own thread, so the detector is read and fed
under a lock; status changes are acted on from the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from butterfly.types.ids import NodeId
from butterfly.types.model import LayerRange
from butterfly.types.wire.control import Heartbeat

log = logging.getLogger(__name__)


class Detector(Protocol):
    def record_heartbeat(self, node: NodeId, now: float) -> None: ...

    def phi(self, node: NodeId, now: float) -> float | None: ...

    def is_suspected(self, node: NodeId, now: float) -> bool: ...

    def is_failed(self, node: NodeId, now: float) -> bool: ...

    def heard_since(self, node: NodeId) -> float | None: ...

    def retune(
        self, *, suspect: float, failed: float, min_std_ms: float, acceptable_pause_ms: float
    ) -> None: ...


class Link(Protocol):
    """Carries heartbeats both ways: UDP threads (control.heartbeats.HeartbeatLink), or
    in one process, a test's hub (butterfly.testing.inprocess)."""

    def start(self) -> None: ...

    def loop_ticked(self) -> None:
        """Called from the event loop each interval: it is still turning."""

    def silence(self, silent: bool) -> None:
        """While `silent`, send no heartbeat: peers then see this node fail (the acting
        gateway cut off from a quorum steps down so: `wiring.isolation`)."""

    def close(self) -> None: ...


OnStatusChange = Callable[[NodeId, str], None]


@dataclass
class PeerView:
    watched_since: float  # when this node began to watch it: start-up, or its joining
    last_seen: float | None = None
    layers: tuple[int, ...] = ()
    requests: int = 0


class Membership:
    def __init__(
        self,
        *,
        node: NodeId,
        members: dict[NodeId, str],
        detector: Detector,
        interval_s: float,
        local_state: Callable[[], tuple[tuple[int, ...], int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node, self.members = node, members
        self._detector, self._interval = detector, interval_s
        self._local_state, self._clock = local_state, clock
        self.peers = {n: PeerView(clock()) for n in members if n != node}
        self._last_status: dict[NodeId, str] = {}
        self._healthy_since: dict[NodeId, float] = {}  # peer -> when `check` first saw it so
        self._lock = threading.Lock()
        self._link: Link | None = None  # the one `run` runs

    def follow(self, members: Collection[NodeId]) -> None:
        """An agreed membership change: a new member is watched from its joining
        ("starting" until its first heartbeat), a removed one is not watched any more and
        reads as failed, so nothing waits on it."""
        with self._lock:
            for gone in [n for n in self.peers if n not in members]:
                del self.peers[gone]
                self._last_status.pop(gone, None)
                self._healthy_since.pop(gone, None)
            for new in members:
                if new != self.node and new not in self.peers:
                    self.peers[new] = PeerView(self._clock())

    def retune_detector(
        self, *, suspect: float, failed: float, min_std_ms: float, acceptable_pause_ms: float
    ) -> None:
        """Changed coordination.phi_* settings: the next status read uses them."""
        with self._lock:
            self._detector.retune(
                suspect=suspect,
                failed=failed,
                min_std_ms=min_std_ms,
                acceptable_pause_ms=acceptable_pause_ms,
            )

    def on_heartbeat(self, sender: NodeId, beat: Heartbeat) -> None:
        """From the heartbeat link's thread."""
        peer = self.peers.get(sender)
        if peer is None:
            return
        with self._lock:
            now = self._clock()
            self._detector.record_heartbeat(sender, now)
            peer.last_seen, peer.layers, peer.requests = now, beat.layers, beat.requests

    def status(self, node: NodeId) -> str:
        if node == self.node:
            return "healthy"
        with self._lock:
            now = self._clock()
            peer = self.peers.get(node)
            if peer is None:
                return "failed"  # not a member (removed: config.roster)
            if peer.last_seen is None:
                return "starting"
            if self._detector.is_failed(node, now):
                return "failed"
            if self._detector.is_suspected(node, now):
                return "suspected"
            return "healthy"

    def never_heard_for(self, node: NodeId) -> float | None:
        """Seconds this node has watched `node` without one heartbeat from it (None: heard
        from, or not a member). The detector has nothing to say of such a peer: it reads
        as "starting" however long it stays silent."""
        with self._lock:
            peer = self.peers.get(node)
            if peer is None or peer.last_seen is not None:
                return None
            return self._clock() - peer.watched_since

    def phi(self, node: NodeId) -> float | None:
        """The detector's suspicion level of `node` now; None before its first heartbeat."""
        with self._lock:
            return self._detector.phi(node, self._clock())

    def is_live(self, node: NodeId) -> bool:
        """Heard from, or not yet expected to be (starting), and not suspected."""
        return self.status(node) in ("starting", "healthy")

    def layers_of(self, node: NodeId) -> LayerRange | None:
        """The layers `node`'s last heartbeat said it holds (None: none, or not heard)."""
        if node == self.node:
            layers = self._local_state()[0]
        else:
            peer = self.peers.get(node)
            layers = peer.layers if peer is not None else ()
        if len(layers) != 2 or not 0 <= layers[0] < layers[1]:
            return None  # a peer's word: nonsense counts as nothing loaded
        return LayerRange(layers[0], layers[1])

    def requests_of(self, node: NodeId) -> int:
        if node == self.node:
            return self._local_state()[1]
        peer = self.peers.get(node)
        return peer.requests if peer is not None else 0

    def heard_at(self, node: NodeId) -> float | None:
        """When (this node's clock) `node`'s latest heartbeat arrived, which `layers_of`
        reports (None: never heard, or not a member); this node itself: now, its own
        state is never stale."""
        if node == self.node:
            return self._clock()
        with self._lock:
            peer = self.peers.get(node)
            return peer.last_seen if peer is not None else None

    def seconds_since(self, node: NodeId) -> float | None:
        seen = self.peers[node].last_seen if node in self.peers else self._clock()
        return None if seen is None else self._clock() - seen

    def healthy_for(self, node: NodeId) -> float | None:
        """Seconds `node` has been healthy without a break (None: not healthy now). A node
        that flaps starts again at every blip, whether `check` saw it as suspected or the
        detector saw it fail and come back between two checks, so recovery can ask for a
        steady run before it gives a returning node work (`policy.returning`)."""
        if node == self.node:
            return math.inf
        if self.status(node) != "healthy":
            return None
        with self._lock:
            now, heard = self._clock(), self._detector.heard_since(node)
        since = self._healthy_since.setdefault(node, now)
        return now - max(since, heard if heard is not None else now)

    def check(self, on_status_change: OnStatusChange) -> None:
        """Report every peer whose status changed since the last check, once per change."""
        for peer in self.peers:
            status = self.status(peer)
            if status != "healthy":
                self._healthy_since.pop(peer, None)
            elif self._last_status.get(peer) != "healthy":
                self._healthy_since[peer] = self._clock()
            if self._last_status.get(peer) != status:
                self._last_status[peer] = status
                log.info("node %s sees node %s as %s", self.node, peer, status)
                on_status_change(peer, status)

    def silence(self, silent: bool) -> None:
        """Send no heartbeat while `silent` (`Link.silence`); before `run` starts the
        link, nothing is sent anyway."""
        if self._link is not None:
            self._link.silence(silent)

    async def run(self, link: Link, on_status_change: OnStatusChange) -> None:
        """Start the link, then watch every peer's status from the event loop, calling
        `on_status_change(peer, status)` on each change (given here, not at construction:
        what reacts to a change, recovery, is built from this object's `status`)."""
        link.start()
        self._link = link
        try:
            while True:
                link.loop_ticked()
                self.check(on_status_change)
                await asyncio.sleep(self._interval)
        finally:
            await asyncio.to_thread(link.close)
