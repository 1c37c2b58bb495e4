"""Start-up and re-plans that no dead or withholding member can block (control.rollout)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from butterfly.control.rollout import Distribution, distribute_plan, gather_status
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.control import PlanAck, PlanAssign, StatusQuery, StatusReply
from butterfly.types.wire.data import Ping, Pong
from butterfly.types.wire.frames import Message
from tests.test_planner import reply

PLAN = StagePlan(
    Epoch(2),
    ((NodeId(0), LayerRange(0, 2)), (NodeId(1), LayerRange(2, 4))),
    ((NodeId(2), LayerRange(0, 2)), (NodeId(3), LayerRange(2, 4))),
)


Handler = Callable[[NodeId, Envelope], Awaitable[tuple[Message, bytes] | None]]


def node(k: int, *, ack: bool | None = True) -> Handler:
    """A peer that answers pings and status queries, and acks plans (`ack`), refuses
    them (False) or never answers them (None: it withholds)."""

    async def handle(peer: NodeId, env: Envelope) -> tuple[Message, bytes] | None:
        msg = env.msg
        if isinstance(msg, Ping):
            return Pong(msg.seq, 0), b""
        if isinstance(msg, StatusQuery):
            return reply(k), b""
        if isinstance(msg, PlanAssign) and ack is not None:
            return PlanAck(msg.epoch, NodeId(k), ack, "" if ack else "cannot load"), b""
        return None

    return handle


async def test_the_first_facts_go_ahead_with_n_minus_f_nodes_after_a_grace() -> None:
    net = MemoryNetwork()
    gateway = net.transport(NodeId(0), lambda e: None)
    for k in (1, 2):  # node 3 was never started: its connections are refused
        await net.transport(NodeId(k), lambda e: None).start(node(k))

    async def local() -> StatusReply:
        return reply(0)

    facts = await asyncio.wait_for(  # a hang guard: 120 s would be the old wait
        gather_status(
            gateway, [NodeId(1), NodeId(2), NodeId(3)], 120.0,
            local=(NodeId(0), local), need=3, grace_s=0.3,
        ),
        20.0,
    )  # fmt: skip
    assert sorted(facts) == [0, 1, 2]


async def distribute(
    net: MemoryNetwork,
    members: int,
    status: Callable[[NodeId], str],
    *,
    local_error: str = "",
    **kw: object,
) -> tuple[Distribution, list[PlanAssign]]:
    applied: list[PlanAssign] = []

    async def apply_local(msg: PlanAssign) -> PlanAck:
        applied.append(msg)
        return PlanAck(msg.epoch, NodeId(0), not local_error, local_error)

    took = await asyncio.wait_for(  # a hang guard: the plan's timeout is 300 s
        distribute_plan(
            plan=PLAN,
            model_hash="",
            node=NodeId(0),
            members=[NodeId(i) for i in range(members)],
            transport=net.transport(NodeId(0), lambda e: None),
            apply_local=apply_local,
            timeout_s=300.0,
            status=status,
            **kw,  # type: ignore[arg-type]
        ),
        20.0,
    )
    return took, applied


async def test_a_plan_not_taken_up_names_who_did_not_instead_of_failing() -> None:
    """Node 1 acks, node 2 refuses, node 3 is unreachable, node 4 never answers and is
    declared failed meanwhile: the distribution returns naming 2, 3 and 4, with node 2's
    own reason (what `/health` then says if no plan can be put in force)."""
    net = MemoryNetwork()
    await net.transport(NodeId(1), lambda e: None).start(node(1))
    await net.transport(NodeId(2), lambda e: None).start(node(2, ack=False))
    await net.transport(NodeId(4), lambda e: None).start(node(4, ack=None))
    took, applied = await distribute(net, 5, lambda n: "failed" if n == 4 else "healthy")
    assert (took.acked, took.down) == ((0, 1), (2, 3, 4))
    assert took.why[NodeId(2)] == "cannot load" and sorted(took.why) == [2, 3, 4]
    assert [m.epoch for m in applied] == [2]


async def test_a_member_that_keeps_its_layers_and_withholds_its_ack_is_down() -> None:
    """Node 2 has nothing to load (`prompt`) yet never acks while heartbeating: it is down
    after `prompt_s`; node 1, also silent but loading, would be waited for."""
    net = MemoryNetwork()
    await net.transport(NodeId(1), lambda e: None).start(node(1))
    await net.transport(NodeId(2), lambda e: None).start(node(2, ack=None))
    took, _ = await distribute(
        net, 3, lambda n: "healthy", prompt=[NodeId(1), NodeId(2)], prompt_s=0.2
    )
    assert (took.acked, took.down) == ((0, 1), (2,))


async def test_a_member_failing_ends_the_wait_for_the_others_loading() -> None:
    """Node 1 is loading (silent, healthy); node 2 is declared failed: the plan names a
    dead node, so the distribution returns at once for the next plan to be decided,
    with node 1 neither acked nor down (it goes on loading on its side)."""
    net = MemoryNetwork()
    await net.transport(NodeId(1), lambda e: None).start(node(1, ack=None))
    await net.transport(NodeId(2), lambda e: None).start(node(2, ack=None))
    took, applied = await distribute(net, 3, lambda n: "failed" if n == 2 else "healthy")
    assert (took.acked, took.down) == ((0,), (2,))
    assert len(applied) == 1


async def test_a_plan_this_node_cannot_load_names_it_down_with_its_reason() -> None:
    """The gateway's own load fails: it is down like any member, with the loader's
    words, for the caller to decide again or say why no plan is in force (it raised, and
    a gateway whose first plan it could not load stopped)."""
    net = MemoryNetwork()
    await net.transport(NodeId(1), lambda e: None).start(node(1))
    took, _ = await distribute(net, 2, lambda n: "healthy", local_error="bad shape")
    assert (took.acked, took.down) == ((1,), (0,))
    assert took.why == {NodeId(0): "bad shape"}
