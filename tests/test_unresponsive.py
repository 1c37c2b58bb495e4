"""The gateway's step-timeout rule: a heartbeating node that leaves `limit` of its last
steps or audits unanswered is declared faulty once; a crashed node never is."""

from __future__ import annotations

import pytest

from butterfly.dataplane.unresponsive import WINDOW, StepTimeouts
from butterfly.types.ids import NodeId

GATEWAY = NodeId(0)


def tracker(status: dict[int, str]) -> tuple[StepTimeouts, list[tuple[NodeId, ...]]]:
    declared: list[tuple[NodeId, ...]] = []

    async def declare(nodes: tuple[NodeId, ...], reason: str) -> None:
        assert "step_timeout" in reason
        declared.append(nodes)

    rule = StepTimeouts(
        gateway=GATEWAY,
        limit=lambda: 3,
        status=lambda n: status.get(n, "healthy"),
        declare=declare,
    )
    return rule, declared


async def test_a_heartbeating_node_is_declared_once_after_the_limit() -> None:
    rule, declared = tracker({})
    for _ in range(2):
        await rule.chain_timed_out((GATEWAY, NodeId(1)), "step")
    assert declared == []
    await rule.timed_out(NodeId(1), "audit")  # audits and steps share the streak
    assert declared == [(NodeId(1),)]
    for _ in range(5):
        await rule.chain_timed_out((GATEWAY, NodeId(1)), "step")
    assert declared == [(NodeId(1),)]


async def test_answers_between_the_timeouts_do_not_hide_them() -> None:
    """A node that withheld every third step was answered on each one's replay, which
    ended its streak: it was never charged while every request through it failed."""
    rule, declared = tracker({})
    for _ in range(2):
        await rule.timed_out(NodeId(2), "step")
        rule.answered((GATEWAY, NodeId(2)))
        rule.answered((NodeId(2),))
    assert declared == []
    await rule.timed_out(NodeId(2), "step")
    assert declared == [(NodeId(2),)]


async def test_timeouts_far_apart_are_forgotten() -> None:
    rule, declared = tracker({})
    for _ in range(10):
        await rule.timed_out(NodeId(2), "step")
        await rule.timed_out(NodeId(2), "step")
        for _ in range(WINDOW):
            rule.answered((GATEWAY, NodeId(2)))
    assert declared == [] and rule.recent == {}


@pytest.mark.parametrize("status", ["suspected", "failed", "starting"])
async def test_a_node_without_heartbeats_is_left_to_the_failure_detector(status: str) -> None:
    rule, declared = tracker({1: status})
    for _ in range(10):
        await rule.timed_out(NodeId(1), "step")
    assert declared == [] and rule.recent == {}


async def test_a_longer_chain_is_not_blamed_on_a_guess() -> None:
    rule, declared = tracker({})
    for _ in range(10):
        await rule.chain_timed_out((GATEWAY, NodeId(1), NodeId(2)), "step")
        await rule.chain_timed_out((), "step")  # the plan changed meanwhile
        await rule.timed_out(GATEWAY, "step")
    assert declared == [] and rule.recent == {}


async def test_timeouts_of_one_stall_count_once() -> None:
    """One stall of a node fails every running request's step at once: counted per
    request, six requests and a 2.5 s stall evicted an honest node (a review)."""
    now = [0.0]
    declared: list[tuple[NodeId, ...]] = []

    async def declare(nodes: tuple[NodeId, ...], reason: str) -> None:
        declared.append(nodes)

    rule = StepTimeouts(
        gateway=GATEWAY,
        limit=lambda: 3,
        status=lambda n: "healthy",
        declare=declare,
        apart=lambda: 1.0,
        clock=lambda: now[0],
    )
    for _ in range(6):
        await rule.timed_out(NodeId(2), "step")
    assert declared == [] and sum(rule.recent[NodeId(2)]) == 1
    for t in (1.5, 3.0):
        now[0] = t
        await rule.timed_out(NodeId(2), "step")
    assert declared == [(NodeId(2),)]
