"""Per-peer circuit breaker (seed 004): stop hammering a peer that keeps failing.

Closed: calls pass; `threshold` consecutive failures open it. Open: calls fail at once
with CircuitOpen until `reset_after` seconds pass. HalfOpen: one trial call (the others
fail at once while it runs); success closes, failure opens again. Time is an argument,
so tests need no sleeping.

A peer that dials in and proves its key is up: an open circuit to it goes half-open
(`heard`) once it has been open a quarter of `reset_after`, instead of failing calls for
the rest of it. A restarted node was refused the plan that took it back, and the
cluster planned without it once more. Not at once: a member that accepts calls and
answers none could redial after each failure and have every call wait out its timeout
(a review); so at most four trials per `reset_after`.
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

    trying: bool = False  # half-open: the trial call is under way

    def allow(self, now: float) -> bool:
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.reset_after:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            if self.trying:
                return False
            self.trying = True
            return True
        return self.state is BreakerState.CLOSED

    def heard(self, now: float) -> None:
        """The peer proved it is up (it dialled in): the next call is a trial, once the
        circuit has been open a quarter of `reset_after`."""
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.reset_after / 4:
            self.state = BreakerState.HALF_OPEN

    def record_success(self) -> None:
        self.state, self.failures, self.trying = BreakerState.CLOSED, 0, False

    def record_failure(self, now: float) -> None:
        self.failures += 1
        self.trying = False
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.state, self.opened_at = BreakerState.OPEN, now
