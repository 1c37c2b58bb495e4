"""What a stage node keeps of the rows it received and sent (`dataplane.received`), for
the audit to ask before it convicts anyone: as long as the request's KV caches are, by
count and idle time as they are, released with them, and exactly what crossed."""

from __future__ import annotations

import torch

from butterfly.dataplane.received import ATTEMPTS, Received
from butterfly.types.ids import RequestId

A, B, C = RequestId("a"), RequestId("b"), RequestId("c")


def rows(value: float, n: int = 2, width: int = 4) -> torch.Tensor:
    return torch.full((1, n, width), value)


def values(held: list[tuple[int, torch.Tensor]]) -> list[float]:
    return [float(r[0, 0, 0]) for _, r in held]


def test_kept_rows_come_back_exactly_by_epoch_step_and_side_in_the_order_asked() -> None:
    kept = Received(max_requests=8, keep_s=60.0)
    x = torch.randn(1, 3, 4)
    before = x.clone()
    kept.keep(A, 1, 0, x, sent=False)
    kept.keep(A, 1, 1, rows(2.0, 1), sent=False)
    kept.keep(A, 1, 1, rows(5.0, 1), sent=True)  # what it sent on at that step
    kept.keep(A, 2, 1, rows(3.0, 1), sent=False)  # the same step under a later plan
    x.add_(1.0)  # the frame's buffer, reused: what was kept is a copy
    held = kept.held(A, 1, (1, 0, 7), sent=False)
    assert [s for s, _ in held] == [1, 0]
    assert torch.equal(held[0][1], rows(2.0, 1)) and torch.equal(held[1][1], before)
    assert values(kept.held(A, 1, (1,), sent=True)) == [5.0]
    assert values(kept.held(A, 2, (1,), sent=False)) == [3.0]
    assert kept.held(B, 1, (0,), sent=False) == []


def test_a_step_sent_again_otherwise_keeps_both_and_the_same_bytes_once() -> None:
    kept = Received(max_requests=8, keep_s=60.0)
    for value in (1.0, 1.0, 2.0):
        kept.keep(A, 1, 0, rows(value), sent=False)
    assert values(kept.held(A, 1, (0,), sent=False)) == [1.0, 2.0]
    for value in range(3, 3 + ATTEMPTS):
        kept.keep(A, 1, 0, rows(float(value)), sent=False)
    held = kept.held(A, 1, (0,), sent=False)
    assert len(held) == ATTEMPTS and values(held)[-1] == 2.0 + ATTEMPTS


def test_large_requests_stay_whatever_their_bytes_until_released() -> None:
    """Nine 1,000-position prompts of a 4,096-wide bf16 model (8 MB each) and one of
    8,200 positions: a byte budget shared by the node dropped the first before its
    audit, and the long one at once (a review); then the honest receiver was convicted."""
    kept = Received(max_requests=16, keep_s=60.0)
    prompt = torch.zeros(1, 1000, 4096, dtype=torch.bfloat16)
    for n in range(9):
        kept.keep(RequestId(f"r{n}"), 1, 0, prompt, sent=False)
    kept.keep(C, 1, 0, torch.zeros(1, 8200, 4096, dtype=torch.bfloat16), sent=False)
    assert kept.held(RequestId("r0"), 1, (0,), sent=False) and kept.held(C, 1, (0,), sent=False)
    kept.release(RequestId("r0"))
    assert kept.held(RequestId("r0"), 1, (0,), sent=False) == [] and kept.requests == 9


def test_past_the_count_the_least_recent_request_leaves_whole() -> None:
    kept = Received(max_requests=2, keep_s=60.0)
    kept.keep(A, 1, 0, rows(1.0), sent=False)
    kept.keep(B, 1, 0, rows(1.0), sent=False)
    kept.keep(A, 1, 1, rows(1.0), sent=True)  # A is the most recent now
    kept.keep(C, 1, 0, rows(1.0), sent=False)  # a third: B, least recently kept to, leaves
    assert kept.held(B, 1, (0,), sent=False) == []
    assert kept.held(A, 1, (0,), sent=False) and kept.held(C, 1, (0,), sent=False)


def test_a_request_not_kept_to_for_the_idle_time_leaves() -> None:
    now = [0.0]
    kept = Received(max_requests=8, keep_s=10.0, clock=lambda: now[0])
    kept.keep(A, 1, 0, rows(1.0), sent=False)
    now[0] = 5.0
    kept.keep(B, 1, 0, rows(1.0), sent=False)
    now[0] = 10.5
    assert kept.held(A, 1, (0,), sent=False) == [] and kept.held(B, 1, (0,), sent=False)
    now[0] = 15.5
    assert kept.held(B, 1, (0,), sent=False) == [] and kept.requests == 0
