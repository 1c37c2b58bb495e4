"""Seed 000's "Failure Detection" example, on the membership a running node uses.

A node learns its peers' health from `control.membership.Membership`: the heartbeat
thread calls `on_heartbeat`, and every heartbeat interval the event loop calls `check`,
which reports each status change once (the node then re-plans around a failed stage).
Here node 0's membership hears node 1 beat every 100 ms for 2 s, then nothing, on a
simulated clock (no sleeping). Phi is printed 100 ms after each heartbeat, as the seed
prints it after its sleep.

Where it departs from the seed: the seed polls at +500 ms and +1000 ms; a node checks
every heartbeat interval, so the status changes are reported at the first check past
each threshold (+500 ms and +600 ms). With the defaults (100 ms, suspect 8, failed 12,
min std 50 ms, acceptable pause 80 ms) the thresholds are crossed 461 ms and 532 ms after
the last heartbeat. When the heartbeats resume the node is healthy again: membership
heals.

    .venv/bin/python examples/failure_detection.py
"""

from __future__ import annotations

from butterfly.control.membership import Membership
from butterfly.protocol.failure_detector import PhiAccrualFailureDetector
from butterfly.types.ids import NodeId
from butterfly.types.wire.control import Heartbeat

INTERVAL_S = 0.1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def main() -> None:
    clock = Clock()
    detector = PhiAccrualFailureDetector(
        100,  # heartbeat every 100 ms
        8.0,  # suspect threshold
        12.0,  # failed threshold
    )
    peer = NodeId(1)

    def on_status_change(node: NodeId, status: str) -> None:
        if status in ("suspected", "failed"):
            print(f"Node {node} {status.upper()} (φ = {membership.phi(node):.2f})")
        elif status == "healthy" and clock.now > 2.0:
            print(f"Node {node} healthy again (φ = {membership.phi(node):.2f})")

    membership = Membership(
        node=NodeId(0),
        members={NodeId(0): "127.0.0.1:7000", peer: "127.0.0.1:7001"},
        detector=detector,
        interval_s=INTERVAL_S,
        local_state=lambda: ((), 0),
        clock=clock,
    )

    def beat(seq: int) -> None:
        membership.on_heartbeat(peer, Heartbeat(seq, clock.now, (0, 4), 0))

    for i in range(20):  # regular heartbeats
        beat(i)
        clock.now = round(clock.now + INTERVAL_S, 9)
        membership.check(on_status_change)
        print(f"Heartbeat {i}: φ = {membership.phi(peer):.2f}")

    print("\nNode stopped sending heartbeats...")
    last = clock.now - INTERVAL_S
    for _ in range(10):  # the node's checks, one per interval, through 1 s of silence
        clock.now = round(clock.now + INTERVAL_S, 9)
        membership.check(on_status_change)
    print(f"Status after 1 s of silence: {membership.status(peer)}")

    suspect_at = detector.crossing_time(peer, detector.suspect_threshold)
    failed_at = detector.crossing_time(peer, detector.failed_threshold)
    if suspect_at is not None and failed_at is not None:
        print(
            f"(thresholds crossed {1000 * (suspect_at - last):.0f} ms and "
            f"{1000 * (failed_at - last):.0f} ms after the last heartbeat)"
        )

    print("\nNode 1 restarts and beats again...")
    beat(100)
    membership.check(on_status_change)


if __name__ == "__main__":
    main()
