"""Phi accrual failure detection (Hayashibara et al.), with the seed's API and defaults.

phi is how unlikely the current silence is, given the heartbeat intervals seen so far:
phi = -log10(P(interval > silence)), intervals modelled as normal. A minimum standard
deviation stops a very regular sender from being suspected after a few milliseconds of
jitter, and an acceptable pause absorbs GC or busy-CPU stalls. With the defaults
(interval 100 ms, min std 50 ms, pause 100 ms) a silent node is suspected (phi 8) after
about 450 ms and failed (phi 12) after about 490 ms, while pauses of 300 ms give phi < 2.

Time is an argument everywhere: the detector never reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from butterfly.types.ids import NodeId


@dataclass
class _History:
    last: float
    intervals: deque[float]


@dataclass
class PhiAccrualFailureDetector:
    heartbeat_interval_ms: float = 100.0
    suspect_threshold: float = 8.0
    failed_threshold: float = 12.0
    min_std_ms: float = 50.0
    acceptable_pause_ms: float = 100.0
    window: int = 200
    _nodes: dict[NodeId, _History] = field(default_factory=dict)

    def record_heartbeat(self, node: NodeId, now: float) -> None:
        """`now` in seconds (any monotonic origin)."""
        h = self._nodes.get(node)
        if h is None:
            # seed the window with the expected interval, so phi is meaningful at once
            first = deque([self.heartbeat_interval_ms / 1000] * 2, maxlen=self.window)
            self._nodes[node] = _History(now, first)
            return
        h.intervals.append(max(0.0, now - h.last))
        h.last = now

    def phi(self, node: NodeId, now: float) -> float | None:
        h = self._nodes.get(node)
        if h is None:
            return None
        n = len(h.intervals)
        mean = sum(h.intervals) / n
        var = sum((x - mean) ** 2 for x in h.intervals) / n
        std = max(math.sqrt(var), self.min_std_ms / 1000)
        y = (now - h.last - mean - self.acceptable_pause_ms / 1000) / std
        # logistic approximation of the normal tail, as Akka and Cassandra use
        e = math.exp(-y * (1.5976 + 0.070566 * y * y)) if y > -10 else math.inf
        if y > 0:
            return -math.log10(e / (1.0 + e)) if e > 0 else 300.0
        return -math.log10(1.0 - 1.0 / (1.0 + e)) if math.isfinite(e) else 0.0

    def is_suspected(self, node: NodeId, now: float) -> bool:
        p = self.phi(node, now)
        return p is not None and p >= self.suspect_threshold

    def is_failed(self, node: NodeId, now: float) -> bool:
        p = self.phi(node, now)
        return p is not None and p >= self.failed_threshold

    def remove(self, node: NodeId) -> None:
        self._nodes.pop(node, None)
