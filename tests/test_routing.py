"""Message routing (wiring.routing): one handler per kind, given the authenticated peer."""

from __future__ import annotations

import asyncio

import pytest

from butterfly.control.plans import AgreedPlans, PlanIntake, plan_command
from butterfly.metrics.events import MessageDropped
from butterfly.net.conn import Reply
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.control import PlanAck, PlanAssign, StatusQuery
from butterfly.types.wire.data import Ping, Pong, Release
from butterfly.wiring.routing import Router
from tests.test_net import Events, pair

pytestmark = pytest.mark.timeout(30)


class Seen:
    """A handler that records who each message came from, and answers pings."""

    def __init__(self) -> None:
        self.calls: list[tuple[NodeId, int, str]] = []  # (peer, claimed sender, kind)
        self.arrived = asyncio.Event()

    async def __call__(self, peer: NodeId, env: Envelope) -> Reply | None:
        self.calls.append((peer, env.sender, env.msg.kind))
        self.arrived.set()
        return (Pong(env.msg.seq, 0), b"") if isinstance(env.msg, Ping) else None


def router(node: int, transport: object, events: Events) -> Router:
    return Router(
        node=NodeId(node),
        transport=transport,  # type: ignore[arg-type]
        cluster_id="c",
        epoch=lambda: 5,
        ask_timeout_s=lambda: 5.0,
        emit=events,
        plan=lambda: None,
        gateway=lambda: NodeId(0),
    )


async def test_each_kind_goes_to_its_handler_and_unknown_kinds_are_dropped() -> None:
    net, events = MemoryNetwork(cluster_id="c"), Events()
    a = router(0, net.transport(NodeId(0), events), events)
    b = router(1, net.transport(NodeId(1), events), events)
    pings, releases = Seen(), Seen()
    await a.start({})
    await b.start({Ping: pings, Release: releases})
    assert await a.ask(NodeId(1), Ping(3)) == Pong(3, 0)
    await a.deliver(NodeId(1), Release(("r",)))
    await asyncio.wait_for(releases.arrived.wait(), 5)
    assert pings.calls == [(0, 0, "ping")] and releases.calls == [(0, 0, "release")]
    await a.deliver(NodeId(1), StatusQuery())  # no route for it on node 1
    for _ in range(100):
        if events.dropped():
            break
        await asyncio.sleep(0.01)
    assert events.dropped() == 1
    await a.close()
    await b.close()


async def test_a_message_to_this_node_itself_is_routed_without_a_socket() -> None:
    events = Events()
    net = MemoryNetwork(cluster_id="c")
    a = router(0, net.transport(NodeId(0), events), events)
    seen = Seen()
    await a.start({Ping: seen})
    net.down.add(NodeId(0))  # no network at all: the local route must not need one
    assert await a.ask(NodeId(0), Ping(9)) == Pong(9, 0)
    assert seen.calls == [(0, 0, "ping")]
    await a.close()


async def test_a_frame_claiming_another_sender_is_dropped_and_counted() -> None:
    """Over TCP, a frame whose header claims node 7 arrives on the connection node 0
    opened (and proved its key on): it never reaches a handler, and is counted; the
    connection's honest frames still are."""
    ta, tb, events = pair()
    seen = Seen()
    a, b = router(0, ta, events), router(1, tb, events)
    await a.start({})
    await b.start({Release: seen})
    ta.peers[NodeId(1)] = tb.address
    tb.peers[NodeId(0)] = ta.address
    conn = await ta.connection(NodeId(1))
    conn.node = NodeId(7)  # what a lying node would write in its frames
    await conn.send(Release(("forged",)))
    conn.node = NodeId(0)
    await conn.send(Release(("honest",)))  # same connection: frames arrive in order
    await asyncio.wait_for(seen.arrived.wait(), 5)
    assert seen.calls == [(0, 0, "release")]
    drops = [e for e in events if isinstance(e, MessageDropped)]
    assert [e.reason for e in drops] == ["sender_mismatch"]
    await a.close()
    await b.close()


async def test_a_plan_is_taken_only_from_the_gateway_peer_whatever_the_frame_claims() -> None:
    events, applied = Events(), []
    plans = AgreedPlans()
    plan = StagePlan(1, ((NodeId(0), LayerRange(0, 2)),))
    plans.execute(plan_command(plan))

    async def apply(msg: PlanAssign) -> PlanAck:
        applied.append(msg)
        return PlanAck(msg.epoch, NodeId(1), True, "")

    intake = PlanIntake(node=NodeId(1), plans=plans, apply=apply, emit=events)
    msg = plan.to_message("m")
    claims_gateway = Envelope(msg, 0, 0, "c")
    assert await intake(NodeId(2), claims_gateway) is None
    assert events.dropped() == 1 and applied == []
    reply = await intake(NodeId(0), claims_gateway)
    assert reply is not None and reply[0].ok and applied == [msg]
