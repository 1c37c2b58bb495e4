"""Per-peer circuit breaker (seed 004): stop hammering a peer that keeps failing.

Closed: calls pass; `threshold` consecutive failures open it. Open: calls fail at once
with CircuitOpen until `reset_after` seconds pass. HalfOpen: one trial call; success
closes, failure opens again. Time is an argument, so tests need no sleeping.

A peer that dials in and proves its key is up: an open circuit to it goes half-open at
once (`heard`) instead of failing calls for the rest of `reset_after`. A restarted node
was refused the plan that took it back, and the cluster planned without it once more.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    threshold: int = 5
    reset_after: float = 1.0
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0

    def allow(self, now: float) -> bool:
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.reset_after:
            self.state = BreakerState.HALF_OPEN
            return True
        return self.state is not BreakerState.OPEN

    def heard(self) -> None:
        """The peer proved it is up (it dialled in): the next call is a trial."""
        if self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN

    def record_success(self) -> None:
        self.state, self.failures = BreakerState.CLOSED, 0

    def record_failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.state, self.opened_at = BreakerState.OPEN, now
