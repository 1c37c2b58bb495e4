"""The gateway's step-timeout rule: a heartbeating node that leaves `limit` steps or
audits in a row unanswered is declared faulty once; a crashed node never is."""

from __future__ import annotations

import pytest

from butterfly.dataplane.unresponsive import StepTimeouts
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


async def test_an_answer_ends_the_streak() -> None:
    rule, declared = tracker({})
    for _ in range(10):
        await rule.timed_out(NodeId(2), "step")
        await rule.timed_out(NodeId(2), "step")
        rule.answered((GATEWAY, NodeId(2)))
    assert declared == []


@pytest.mark.parametrize("status", ["suspected", "failed", "starting"])
async def test_a_node_without_heartbeats_is_left_to_the_failure_detector(status: str) -> None:
    rule, declared = tracker({1: status})
    for _ in range(10):
        await rule.timed_out(NodeId(1), "step")
    assert declared == [] and rule.counts == {}


async def test_a_longer_chain_is_not_blamed_on_a_guess() -> None:
    rule, declared = tracker({})
    for _ in range(10):
        await rule.chain_timed_out((GATEWAY, NodeId(1), NodeId(2)), "step")
        await rule.chain_timed_out((), "step")  # the plan changed meanwhile
        await rule.timed_out(GATEWAY, "step")
    assert declared == [] and rule.counts == {}
