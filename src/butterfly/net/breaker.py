"""Per-peer circuit breaker (seed 004): stop hammering a peer that keeps failing.

Closed: calls pass; `threshold` consecutive failures open it. Open: calls fail at once
with CircuitOpen until `reset_after` seconds pass. HalfOpen: calls are tried (the
transport dials each channel once at a time, the calls on it wait for that dial);
success closes, failure opens again. Time is an argument, so tests need no sleeping.

A peer that dials in and proves its key is up (`heard`): an open circuit to it goes
half-open a quarter of `reset_after` after it opened, instead of failing calls for the
rest of it. A restarted node was refused the plan that took it back, and the cluster
planned without it once more. Not at once: a member that accepts calls and answers none
could redial after each failure and have every call wait out its timeout (a review);
so at most four half-open spells per `reset_after`. A dial-in is remembered: a restarted
node dials once and keeps its connections, and one that dialled in early had its
circuit stay open for all of `reset_after` (a review).
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
    heard_at: float | None = None  # when the peer last dialled in

    def allow(self, now: float) -> bool:
        if self.state is BreakerState.OPEN:
            waited = now - self.opened_at
            dialled = self.heard_at is not None and self.heard_at >= self.opened_at
            if waited >= self.reset_after or (dialled and waited >= self.reset_after / 4):
                self.state = BreakerState.HALF_OPEN
        return self.state is not BreakerState.OPEN

    def heard(self, now: float) -> None:
        """The peer proved it is up (it dialled in): the circuit, if open, half-opens
        once it has been open a quarter of `reset_after` (`allow`)."""
        self.heard_at = now

    def record_success(self) -> None:
        self.state, self.failures = BreakerState.CLOSED, 0

    def record_failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.state, self.opened_at = BreakerState.OPEN, now
