"""Phi accrual detection with a fake clock: the seed's timings and no false suspicion."""

from __future__ import annotations

import itertools
import random

import pytest

from butterfly.protocol import failure_detector
from butterfly.protocol.failure_detector import (
    DetectorState,
    Health,
    PhiAccrualFailureDetector,
    phi_of,
)
from butterfly.protocol.inputs import Tick
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.control import Heartbeat

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
    detector.record_heartbeat(NODE, 4.0)  # out of order: ignored
    assert detector.phi(NODE, 5.05) == detector.phi(NODE, 5.05)
    detector.forget(NODE)
    assert detector.nodes() == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        PhiAccrualFailureDetector(100, 12.0, 8.0)
    with pytest.raises(ValueError):
        PhiAccrualFailureDetector(0)


def test_phi_is_monotonic_and_finite_far_in_the_tail() -> None:
    values = [phi_of(z / 4) for z in range(-20, 400)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[-1] < 1e4


def test_step_reports_each_transition_once_and_recovery() -> None:
    state = DetectorState(PhiAccrualFailureDetector())
    beat = Heartbeat(NODE, Epoch(0), seq=0)
    for i in range(20):
        state, changes = failure_detector.step(state, beat, i * 0.1)
        assert changes == []
    deadline = failure_detector.next_deadline(state)
    assert deadline is not None and 1.9 + 0.4 < deadline < 1.9 + 0.5
    state, changes = failure_detector.step(state, Tick(), deadline)
    assert [(c.node, c.health) for c in changes] == [(NODE, Health.SUSPECTED)]
    state, changes = failure_detector.step(state, Tick(), deadline + 0.01)
    assert changes == []
    later = failure_detector.next_deadline(state)
    assert later is not None
    state, changes = failure_detector.step(state, Tick(), later)
    assert [c.health for c in changes] == [Health.FAILED]
    state, changes = failure_detector.step(state, beat, later + 0.01)
    assert [c.health for c in changes] == [Health.ALIVE]
