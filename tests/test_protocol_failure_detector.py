"""Phi accrual detection with a fake clock: the seed's timings and no false suspicion."""

from __future__ import annotations

import itertools
import random

import pytest

from butterfly.protocol.failure_detector import PhiAccrualFailureDetector, phi_of
from butterfly.types.ids import NodeId

NODE = NodeId(1)


def regular(detector: PhiAccrualFailureDetector, beats: int = 20) -> float:
    """The seed's example: a heartbeat every 100 ms; returns the last one's time."""
    t = 0.0
    for i in range(beats):
        t = i * 0.1
        detector.record_heartbeat(NODE, t)
    return t


def test_seed_example_suspected_within_500ms_failed_within_1000ms() -> None:
    detector = PhiAccrualFailureDetector(100, 8.0, 12.0)
    last = regular(detector)
    phi_between_beats = detector.phi(NODE, last + 0.1)
    assert phi_between_beats is not None and phi_between_beats < 1.0
    assert not detector.is_suspected(NODE, last + 0.3)  # a missed beat or two is fine
    assert detector.is_suspected(NODE, last + 0.5)
    assert not detector.is_failed(NODE, last + 0.5)
    assert detector.is_failed(NODE, last + 1.0)
    suspect_at = detector.crossing_time(NODE, 8.0)
    failed_at = detector.crossing_time(NODE, 12.0)
    assert suspect_at is not None and failed_at is not None
    assert 0.4 < suspect_at - last < 0.5 and suspect_at < failed_at <= last + 1.0
    phi_at_suspicion = detector.phi(NODE, suspect_at)
    assert phi_at_suspicion == pytest.approx(8.0, abs=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_jittery_heartbeats_and_gc_pauses_raise_no_suspicion(seed: int) -> None:
    rng = random.Random(seed)
    detector = PhiAccrualFailureDetector()
    t, worst = 0.0, 0.0
    detector.record_heartbeat(NODE, t)
    for _ in range(3000):
        gap = 0.25 if rng.random() < 0.05 else rng.uniform(0.04, 0.16)  # 100 +- 60 ms
        worst = max(worst, detector.phi(NODE, t + gap) or 0.0)  # just before it arrives
        t += gap
        detector.record_heartbeat(NODE, t)
    assert worst < 8.0 / 2


def test_a_long_stall_after_a_perfectly_regular_history_is_tolerated() -> None:
    detector = PhiAccrualFailureDetector()
    last = regular(detector, beats=500)  # std would be ~0 without the minimum
    assert not detector.is_suspected(NODE, last + 0.35)  # a 350 ms stall


def test_the_window_is_bounded_and_forgets_old_intervals() -> None:
    detector = PhiAccrualFailureDetector(window=10)
    t = 0.0
    for _ in range(50):  # slow history: 1 s intervals
        t += 1.0
        detector.record_heartbeat(NODE, t)
    for _ in range(10):  # then 10 fast ones fill the whole window
        t += 0.1
        detector.record_heartbeat(NODE, t)
    assert detector.is_suspected(NODE, t + 0.6)  # the slow past no longer counts


def test_unknown_nodes_and_stale_timestamps() -> None:
    detector = PhiAccrualFailureDetector()
    assert detector.phi(NODE, 1.0) is None and not detector.is_suspected(NODE, 1.0)
    detector.record_heartbeat(NODE, 5.0)
    before = detector.phi(NODE, 5.05)
    detector.record_heartbeat(NODE, 4.0)  # out of order: ignored
    assert detector.phi(NODE, 5.05) == before


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        PhiAccrualFailureDetector(100, 12.0, 8.0)
    with pytest.raises(ValueError):
        PhiAccrualFailureDetector(0)


def test_phi_is_monotonic_and_finite_far_in_the_tail() -> None:
    values = [phi_of(z / 4) for z in range(-20, 400)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[-1] < 1e4


def test_a_node_back_after_being_failed_starts_a_new_history() -> None:
    """Its absence is not an interval: counted, a 30 s gap would keep the node's next
    failure unnoticed for seconds; forgotten, the next silence is judged as before."""
    detector = PhiAccrualFailureDetector()
    last = regular(detector, beats=200)
    assert detector.is_failed(NODE, last + 30.0)
    back = last + 30.0
    detector.record_heartbeat(NODE, back)
    assert not detector.is_suspected(NODE, back + 0.05)
    t = back
    for _ in range(20):
        t += 0.1
        detector.record_heartbeat(NODE, t)
    assert detector.is_failed(NODE, t + 1.0)  # as fast as before the absence
