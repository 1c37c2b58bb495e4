"""The gateway's pipeline engine decides retries by the error tree: a step that fails with
a retriable error is replayed, one that fails with a non-retriable error fails the request
at once, and either is counted against the peer the error blames (the authenticated
sender of the failure, not the node the frame names)."""

from __future__ import annotations

import pytest

from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.metrics.events import MetricsEvent, PeerError
from butterfly.types.errors import InvalidInput
from butterfly.types.ids import NodeId
from tests.engine_util import GATEWAY, STAGE, chain, generate


async def test_a_retriable_step_error_is_replayed_and_blamed_on_the_sender() -> None:
    events: list[MetricsEvent] = []
    engine, sent = chain([(True, 7)], events)
    assert await generate(engine) == [3, 3]
    assert len(sent) == 3  # the failed step, its replay, the second token
    assert sent[1].starts == (0,) and sent[1].lengths == (2,)  # replayed from position 0
    # the frame claimed node 7; the peer that sent it is node 1, and it is the one counted
    assert events.count(PeerError(node=STAGE, error="connection_failed", retriable=True)) == 1


async def test_a_non_retriable_step_error_fails_the_request_at_once() -> None:
    events: list[MetricsEvent] = []
    engine, sent = chain([(False, 1)], events)
    with pytest.raises(InvalidInput) as e:
        await generate(engine)
    assert e.value.blame == STAGE and not e.value.retriable
    assert len(sent) == 1  # never retried
    assert PeerError(node=STAGE, error="invalid_input", retriable=False) in events


async def test_a_timed_out_step_is_replayed_and_counted_against_the_silent_node() -> None:
    declared: list[tuple[NodeId, ...]] = []

    async def declare(nodes: tuple[NodeId, ...], reason: str) -> None:
        declared.append(nodes)

    rule = StepTimeouts(
        gateway=GATEWAY, limit=lambda: 1, status=lambda n: "healthy", declare=declare
    )
    events: list[MetricsEvent] = []
    engine, sent = chain(["silent"], events, rule, step_timeout_s=0.2)
    assert await generate(engine, tokens=1) == [3]
    assert len(sent) == 2 and declared == [(STAGE,)]


def test_the_audit_takes_the_shape_before_a_change_only_for_requests_begun_in_its_grace() -> None:
    """Measured from the change at the audit, the grace left a request that ran past it
    unverified, its early records of the shape before (a review); and a shape agreed
    once and left was taken for ever (the review before)."""
    import time

    from butterfly.dataplane.proving import SHAPE_GRACE_S, Shape, Shapes
    from butterfly.dataplane.sending import RecordSize
    from butterfly.protocol.proof import Tolerance

    shapes = Shapes(Shape(8, 1), Shape(8, 1))
    assert shapes.accepted(100.0) == Shape(8, 1)
    shapes.change(Shape(16, 1), now=200.0)
    assert shapes.accepted(150.0) == Shape(8, 1)  # begun before: either shape
    assert shapes.accepted(200.0) == Shape(8, 1)  # in the grace
    assert shapes.accepted(200.0 + SHAPE_GRACE_S) == Shape(16, 1)
    shapes.change(Shape(16, 1), now=300.0)  # agreed again: the one before is gone
    assert shapes.accepted(300.0) == Shape(16, 1)
    # the engine's audit takes what `retune` agreed
    engine, _ = chain([], [], records=RecordSize(8, 1))
    engine.retune(
        step_timeout_s=30.0,
        verification="audit",
        audit_fraction=1.0,
        tolerance=Tolerance(),
        records=RecordSize(16, 1),
    )
    assert engine._shapes is not None
    assert engine._shapes.accepted(time.monotonic() + SHAPE_GRACE_S) == Shape(16, 1)
    assert engine._shapes.accepted(time.monotonic()) == Shape(8, 1)


async def test_a_plan_change_fails_a_relayed_or_re_run_hop_sent_on_the_plan_before() -> None:
    """It failed every step waiting on the older plan but a relay's first half and a
    node-by-node re-run's hop, which waited out their step timeout instead."""
    import asyncio

    from butterfly.types.errors import StageLost
    from butterfly.types.ids import RequestId

    engine, _ = chain([], [])
    flight = engine._flight
    old: asyncio.Future[tuple[object, tuple[bytes, ...]]] = (
        asyncio.get_running_loop().create_future()
    )
    now: asyncio.Future[tuple[object, tuple[bytes, ...]]] = (
        asyncio.get_running_loop().create_future()
    )
    epoch = engine._epoch()
    for step, fut, sent_in in ((1, old, epoch - 1), (2, now, epoch)):
        flight.relaying[(RequestId("r"), step)] = (fut, 1)  # type: ignore[assignment]
        flight.sent_in[(RequestId("r"), step)] = sent_in
    engine.plan_changed()
    assert isinstance(old.exception(), StageLost)
    assert not now.done()
