"""Inputs a reducer receives that never cross the wire: the driver makes them locally.

Wire messages live in `butterfly.types.wire`; these sit beside them in a reducer's
`step(state, message, now)` so one `match` covers everything that can happen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed, fed at a reducer's `next_deadline`."""


@dataclass(frozen=True, slots=True)
class SuspectPrimary:
    """This node's failure detector declared the primary of `view` failed, so the replica
    votes for the next view now instead of waiting for a request to time out (a dead
    primary costs detection time, not the request timeout)."""

    view: int
