"""Phi accrual failure detection (Hayashibara et al., 2004), with Akka's safeguards.

Instead of a yes/no timeout, phi says how unlikely the current silence is given the
heartbeat intervals seen so far: phi = -log10(P(interval > silence)), with the intervals
modelled as a normal distribution. Phi 8 means a one-in-10^8 delay.

Two safeguards keep busy nodes from looking dead (DESIGN.md section 3):
- `min_std_ms`: a perfectly regular history would otherwise have a tiny standard
  deviation, and the first late heartbeat would send phi to infinity;
- `acceptable_pause_ms`: added to the mean, so a GC pause or a CPU busy with a forward
  pass of that length costs (almost) nothing.
With the defaults (100 ms interval, min std 50 ms, pause 80 ms) a node that stops is
suspected (phi 8) 461 ms and failed (phi 12) 532 ms after its last heartbeat, while
heartbeats jittering by +-60 ms with occasional 250 ms stalls stay below phi 2.

Time is an argument (seconds, any monotonic origin); nothing here reads a clock. A node
owns one detector inside `control.membership.Membership`, fed by the heartbeat thread.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from butterfly.types.ids import NodeId

_LN10 = math.log(10.0)
_SQRT2 = math.sqrt(2.0)


def phi_of(z: float) -> float:
    """-log10 of the normal upper tail beyond `z`, accurate far into the tail."""
    if z < 30.0:
        tail = 0.5 * math.erfc(z / _SQRT2)
        return -math.log10(tail) if tail > 0.0 else math.inf
    # Mills ratio: Q(z) ~ pdf(z) / z, since erfc underflows long before phi overflows
    return (z * z / 2.0 + math.log(z * math.sqrt(2.0 * math.pi))) / _LN10


def z_at(threshold: float) -> float:
    """The z at which `phi_of` reaches `threshold` (phi_of increases in z: bisection)."""
    lo, hi = 0.0, 40.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if phi_of(mid) < threshold else (lo, mid)
    return hi


def steady_detection_s(
    interval_ms: float, threshold: float, *, min_std_ms: float, acceptable_pause_ms: float
) -> float:
    """How long after its last heartbeat a node whose heartbeats came like clockwork
    reaches phi `threshold` when it stops: the shortest detection delay these settings
    allow (jitter in the history only lengthens it)."""
    mean = (interval_ms + acceptable_pause_ms) / 1000.0
    return mean + z_at(threshold) * min_std_ms / 1000.0


@dataclass(slots=True)
class _History:
    """Bounded window of inter-arrival times with running sums (O(1) per heartbeat)."""

    window: int
    last: float
    first: float  # the first heartbeat of this history (a return after failing starts one)
    intervals: deque[float] = field(default_factory=deque)
    total: float = 0.0
    squares: float = 0.0

    def add(self, interval: float) -> None:
        if len(self.intervals) == self.window:
            old = self.intervals.popleft()
            self.total -= old
            self.squares -= old * old
        self.intervals.append(interval)
        self.total += interval
        self.squares += interval * interval

    def mean(self) -> float:
        return self.total / len(self.intervals)

    def std(self) -> float:
        mean = self.mean()
        return math.sqrt(max(0.0, self.squares / len(self.intervals) - mean * mean))


class PhiAccrualFailureDetector:
    """Per-peer phi from heartbeat arrival times; `now` is always passed in (seconds)."""

    def __init__(
        self,
        interval_ms: float = 100.0,
        suspect_threshold: float = 8.0,
        failed_threshold: float = 12.0,
        *,
        min_std_ms: float = 50.0,
        acceptable_pause_ms: float = 80.0,
        window: int = 1000,
    ) -> None:
        if interval_ms <= 0 or min_std_ms <= 0 or acceptable_pause_ms < 0 or window < 2:
            raise ValueError(
                "interval and min std must be positive, the pause non-negative, window >= 2"
            )
        if not 0 < suspect_threshold <= failed_threshold:
            raise ValueError(
                f"thresholds must satisfy 0 < suspect ({suspect_threshold}) <= failed "
                f"({failed_threshold})"
            )
        self.interval = interval_ms / 1000.0
        self.suspect_threshold = suspect_threshold
        self.failed_threshold = failed_threshold
        self.min_std = min_std_ms / 1000.0
        self.acceptable_pause = acceptable_pause_ms / 1000.0
        self.window = window
        self._history: dict[NodeId, _History] = {}

    def retune(
        self, *, suspect: float, failed: float, min_std_ms: float, acceptable_pause_ms: float
    ) -> None:
        """New thresholds and noise allowances (coordination.phi_*, hot-reloadable); the
        heartbeat history is kept, so no peer looks new, and the next `phi` uses them."""
        if not 0 < suspect <= failed or min_std_ms <= 0 or acceptable_pause_ms < 0:
            raise ValueError(
                f"need 0 < suspect ({suspect}) <= failed ({failed}), min std > 0, pause >= 0"
            )
        self.suspect_threshold, self.failed_threshold = suspect, failed
        self.min_std, self.acceptable_pause = min_std_ms / 1000.0, acceptable_pause_ms / 1000.0

    def record_heartbeat(self, node: NodeId, now: float) -> None:
        """A heartbeat from `node` arrived at `now`; out-of-order times are ignored.

        A heartbeat after a silence already judged failed (a restarted or thawed node)
        starts a new history: that silence was an absence, not an interval, and counting
        it would widen the model so far that the node's next failure went unnoticed for
        seconds (a 30 s absence in a window of 1000 turns a 50 ms deviation into ~1 s)."""
        history = self._history.get(node)
        if history is not None and now > history.last and self.is_failed(node, now):
            history = None
        if history is None:
            history = self._history[node] = _History(self.window, now, now)
            # Akka's bootstrap: until real intervals exist, assume the configured one
            history.add(self.interval * 0.75)
            history.add(self.interval * 1.25)
            return
        if now <= history.last:
            return
        history.add(now - history.last)
        history.last = now

    def heard_since(self, node: NodeId) -> float | None:
        """When the heartbeats of `node` began without a failure since (its first, or its
        first after it was judged failed); None if it never sent one."""
        history = self._history.get(node)
        return None if history is None else history.first

    def phi(self, node: NodeId, now: float) -> float | None:
        """Suspicion level of `node` at `now`; None if it never sent a heartbeat."""
        history = self._history.get(node)
        if history is None:
            return None
        mean, std = self._model(history)
        return phi_of((max(0.0, now - history.last) - mean) / std)

    def _model(self, history: _History) -> tuple[float, float]:
        return history.mean() + self.acceptable_pause, max(history.std(), self.min_std)

    def is_suspected(self, node: NodeId, now: float) -> bool:
        value = self.phi(node, now)
        return value is not None and value >= self.suspect_threshold

    def is_failed(self, node: NodeId, now: float) -> bool:
        value = self.phi(node, now)
        return value is not None and value >= self.failed_threshold

    def crossing_time(self, node: NodeId, threshold: float) -> float | None:
        """When phi of a silent `node` reaches `threshold`: the detection delay it implies."""
        history = self._history.get(node)
        if history is None:
            return None
        mean, std = self._model(history)
        return history.last + mean + z_at(threshold) * std + 1e-9  # at, not just before
