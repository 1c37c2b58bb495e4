"""Seed 000's "Failure Detection" example on a simulated clock (no sleeping).

Node 1 sends a heartbeat every 100 ms for 2 s, then stops. Phi is printed 100 ms after
each heartbeat (as the seed does after its sleep), then 500 ms and 1000 ms into the
silence. With the defaults (100 ms, suspect 8, failed 12, min std 50 ms, acceptable pause
80 ms) the node is suspected 461 ms and failed 532 ms after its last heartbeat.

    .venv/bin/python examples/failure_detection.py
"""

from __future__ import annotations

from butterfly.protocol.failure_detector import PhiAccrualFailureDetector
from butterfly.types.ids import NodeId


def main() -> None:
    detector = PhiAccrualFailureDetector(
        100,  # heartbeat every 100 ms
        8.0,  # suspect threshold
        12.0,  # failed threshold
    )
    node = NodeId(1)
    now = 0.0
    for i in range(20):  # regular heartbeats
        detector.record_heartbeat(node, now)
        now += 0.1
        phi = detector.phi(node, now)
        if phi is not None:
            print(f"Heartbeat {i}: φ = {phi:.2f}")

    print("\nNode stopped sending heartbeats...")
    last = now - 0.1
    now = last + 0.5
    if detector.is_suspected(node, now):
        print(f"Node {node} SUSPECTED (φ = {detector.phi(node, now):.2f})")
    now = last + 1.0
    if detector.is_failed(node, now):
        print(f"Node {node} FAILED (φ = {detector.phi(node, now):.2f})")

    suspect_at = detector.crossing_time(node, detector.suspect_threshold)
    failed_at = detector.crossing_time(node, detector.failed_threshold)
    if suspect_at is not None and failed_at is not None:
        print(
            f"\n(thresholds crossed {1000 * (suspect_at - last):.0f} ms and "
            f"{1000 * (failed_at - last):.0f} ms after the last heartbeat)"
        )


if __name__ == "__main__":
    main()
