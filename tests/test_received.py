"""What a stage node keeps of the inputs it received (`dataplane.received`), for the
audit to ask when it would convict it: bounded in bytes and in time, whole requests
leaving oldest first, exactly what was received coming back."""

from __future__ import annotations

import torch

from butterfly.dataplane.received import ATTEMPTS, Received
from butterfly.types.ids import RequestId

A, B, C = RequestId("a"), RequestId("b"), RequestId("c")


def rows(value: float, n: int = 2, width: int = 4) -> torch.Tensor:
    return torch.full((1, n, width), value)


def test_kept_inputs_come_back_exactly_by_epoch_and_step_in_the_order_asked() -> None:
    kept = Received()
    x = torch.randn(1, 3, 4)
    before = x.clone()
    kept.keep(A, 1, 0, x)
    kept.keep(A, 1, 1, rows(2.0, 1))
    kept.keep(A, 2, 1, rows(3.0, 1))  # the same step under a later plan
    x.add_(1.0)  # the frame's buffer, reused: what was kept is a copy
    held = kept.held(A, 1, (1, 0, 7))
    assert [s for s, _ in held] == [1, 0]
    assert torch.equal(held[0][1], rows(2.0, 1)) and torch.equal(held[1][1], before)
    assert [float(r[0, 0, 0]) for _, r in kept.held(A, 2, (1,))] == [3.0]
    assert kept.held(B, 1, (0,)) == []


def test_a_step_sent_again_otherwise_keeps_both_and_the_same_bytes_once() -> None:
    kept = Received()
    for value in (1.0, 1.0, 2.0):
        kept.keep(A, 1, 0, rows(value))
    assert [float(r[0, 0, 0]) for _, r in kept.held(A, 1, (0,))] == [1.0, 2.0]
    for value in range(3, 3 + ATTEMPTS):
        kept.keep(A, 1, 0, rows(float(value)))
    held = kept.held(A, 1, (0,))
    assert len(held) == ATTEMPTS and float(held[-1][1][0, 0, 0]) == 2.0 + ATTEMPTS
    assert kept.nbytes == ATTEMPTS * rows(0.0).nbytes


def test_past_the_byte_bound_the_least_recent_request_leaves_whole() -> None:
    size = rows(0.0).nbytes
    kept = Received(limit=4 * size)
    kept.keep(A, 1, 0, rows(1.0))
    kept.keep(B, 1, 0, rows(1.0))
    kept.keep(A, 1, 1, rows(1.0))  # A is the most recent now
    kept.keep(C, 1, 0, rows(1.0))
    kept.keep(C, 1, 1, rows(2.0))  # 5 rows' worth: B, least recently added to, leaves
    assert kept.held(B, 1, (0,)) == []
    assert len(kept.held(A, 1, (0, 1))) == 2 and len(kept.held(C, 1, (0, 1))) == 2
    assert kept.nbytes == 4 * size


def test_a_request_not_added_to_for_the_keep_time_leaves() -> None:
    now = [0.0]
    kept = Received(keep_s=10.0, clock=lambda: now[0])
    kept.keep(A, 1, 0, rows(1.0))
    now[0] = 5.0
    kept.keep(B, 1, 0, rows(1.0))
    now[0] = 10.5
    assert kept.held(A, 1, (0,)) == [] and len(kept.held(B, 1, (0,))) == 1
    now[0] = 15.5
    assert kept.held(B, 1, (0,)) == [] and kept.nbytes == 0
