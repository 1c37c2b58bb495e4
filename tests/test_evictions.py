"""Evictions: in the agreed log and the gateway's store, idempotent, never forgotten.

The gateway's real `Recovery` and `AgreedPlans`, a real SQLite store and the real plan
distribution over the in-memory transport; the agreement is one in-process log that
executes in order on the gateway and applies `agreement.authority` as the replicas do
(tests/test_agreement_authority.py shows the replicas refuse a member's commands over
real PBFT). A restarted gateway is a new `Recovery` over a new `AgreedPlans` (nothing
replayed yet) and the reopened store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from butterfly.agreement.authority import UnauthorizedCommand, authorized
from butterfly.control.plans import AgreedPlans, plan_command
from butterfly.control.policy import Placing
from butterfly.control.recovery import Recovery
from butterfly.metrics.events import discard
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.schedule.store import TaskStore
from butterfly.types.errors import ConsensusTimeout
from butterfly.types.ids import GATEWAY, Epoch, NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.commands import Command, EvictNode, NewPlan, decode_command
from butterfly.types.wire.control import PlanAck, PlanAssign
from butterfly.types.wire.frames import Message
from tests.test_planner import layers, reply

pytestmark = pytest.mark.timeout(60)
MEMBERS = [NodeId(i) for i in range(4)]
FACTS = {n: reply(n) for n in MEMBERS}


@dataclass
class Log:
    """The agreed log as every node executes it: in order, unauthorized commands skipped."""

    plans: AgreedPlans
    entries: list[tuple[NodeId, Command]] = field(default_factory=list)
    reachable: bool = True

    def order(self, command: Command, proposer: NodeId) -> bool:
        if authorized(command, proposer) is not None:
            return False
        self.entries.append((proposer, command))
        if isinstance(command, EvictNode | NewPlan):
            self.plans.execute(command)
        return True

    async def propose(self, data: bytes, timeout: float) -> int:
        """The gateway's `propose`."""
        if not self.reachable:
            raise ConsensusTimeout("no quorum")
        command = decode_command(data)
        if not self.order(command, GATEWAY):
            raise UnauthorizedCommand(str(authorized(command, GATEWAY)))
        await asyncio.sleep(0)
        return len(self.entries)

    def evictions(self) -> list[NodeId]:
        return [c.node for _, c in self.entries if isinstance(c, EvictNode)]


class Holder:
    """The gateway's stage server, as far as recovery sees it."""

    def __init__(self) -> None:
        self.plan: StagePlan | None = None

    async def apply_plan(self, msg: PlanAssign) -> PlanAck:
        self.plan = StagePlan.from_message(msg)
        return PlanAck(msg.epoch, GATEWAY, True, "")


@dataclass
class Gateway:
    recovery: Recovery
    log: Log
    holder: Holder

    def holders(self) -> set[int]:
        plan = self.holder.plan
        assert plan is not None
        return {*plan.nodes, *(n for n, _ in plan.replicas)}


@pytest.fixture
async def net() -> AsyncIterator[MemoryNetwork]:
    """Nodes 1-3 acknowledge every plan handed to them."""
    network = MemoryNetwork()
    for i in MEMBERS[1:]:

        async def ack(peer: NodeId, env: Envelope, i: NodeId = i) -> tuple[Message, bytes] | None:
            msg = env.msg
            return (PlanAck(msg.epoch, i, True, ""), b"") if isinstance(msg, PlanAssign) else None

        await network.transport(i, discard).start(ack)
    yield network


def gateway(net: MemoryNetwork, plans: AgreedPlans | None = None) -> Gateway:
    log, holder = Log(plans or AgreedPlans()), Holder()
    recovery = Recovery(
        node=GATEWAY,
        members=MEMBERS,
        status=lambda n: "healthy",
        holder=holder,
        plans=log.plans,
        propose=log.propose,
        agree_timeout_s=1.0,
        transport=net.transport(GATEWAY, discard),
        model_hash="h",
        placing=Placing(tuple(layers(12)), "load_balanced", 2),
        suspect_primary=lambda n: None,
        emit=discard,
    )
    return Gateway(recovery, log, holder)


@contextlib.asynccontextmanager
async def running(gw: Gateway) -> AsyncIterator[None]:
    task = asyncio.create_task(gw.recovery.run(on_replanned=lambda: None))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: Callable[[], bool]) -> None:
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("not reached")


async def test_an_eviction_already_agreed_still_takes_the_liar_out_of_the_plan(
    net: MemoryNetwork, tmp_path: Path
) -> None:
    """The agreed log holds node 1's eviction before the data path proves it a liar (one
    replayed, or ordered beyond f liars): the proof must still take it out of the plan."""
    gw = gateway(net)
    store = TaskStore(tmp_path / "tasks.sqlite")
    await gw.recovery.start(FACTS, store)
    assert gw.holders() == {0, 1, 2, 3}
    gw.log.plans.evicted[NodeId(1)] = "recorded earlier"  # in the log, not yet acted on
    async with running(gw):
        await gw.recovery.evict_liars((NodeId(1),), "contradicts the re-execution")
        await until(lambda: 1 not in gw.holders())
    assert gw.log.evictions() == []  # not ordered twice
    assert store.evictions() == {NodeId(1): "contradicts the re-execution"}
    store.close()


async def test_evicting_twice_is_one_record(net: MemoryNetwork, tmp_path: Path) -> None:
    gw = gateway(net)
    store = TaskStore(tmp_path / "tasks.sqlite")
    await gw.recovery.start(FACTS, store)
    async with running(gw):
        await gw.recovery.evict_liars((NodeId(2),), "first proof")
        await gw.recovery.evict_liars((NodeId(2), NodeId(2)), "second proof")
        gw.log.order(EvictNode(NodeId(2), "a duplicate ordered"), GATEWAY)
        await until(lambda: 2 not in gw.holders())
    assert gw.log.evictions().count(NodeId(2)) == 2  # the one ordered, then the duplicate
    assert gw.log.plans.evicted == {NodeId(2): "first proof"}
    assert store.evictions() == {NodeId(2): "first proof"}
    store.close()


async def test_a_liar_cannot_pre_empt_its_own_eviction(net: MemoryNetwork, tmp_path: Path) -> None:
    """Node 3 orders its own eviction (with a harmless reason) and a plan keeping itself:
    neither is ordered; the gateway's eviction, with its proof, is; and no honest node
    leaves the plan."""
    gw = gateway(net)
    store = TaskStore(tmp_path / "tasks.sqlite")
    await gw.recovery.start(FACTS, store)
    first = gw.holder.plan
    assert first is not None
    assert not gw.log.order(EvictNode(NodeId(3), "maintenance"), NodeId(3))
    keep_me = StagePlan(Epoch(9), ((NodeId(3), LayerRange(0, 12)),))
    assert not gw.log.order(plan_command(keep_me), NodeId(3))
    async with running(gw):
        await gw.recovery.evict_liars((NodeId(3),), "signed a wrong result")
        await until(lambda: 3 not in gw.holders())
    assert gw.log.plans.evicted == {NodeId(3): "signed a wrong result"}
    assert gw.recovery.evicted == {NodeId(3)}  # no honest node evicted
    assert gw.holders() <= {0, 1, 2}
    assert gw.log.plans.latest is not None and gw.log.plans.latest.epoch == first.epoch + 1
    store.close()


async def test_a_plan_naming_an_evicted_node_is_skipped_everywhere() -> None:
    plans = AgreedPlans()
    plans.execute(plan_command(StagePlan(Epoch(1), ((NodeId(0), LayerRange(0, 12)),))))
    plans.execute(EvictNode(NodeId(1), "lied"))
    back = StagePlan(Epoch(2), ((NodeId(0), LayerRange(0, 6)), (NodeId(1), LayerRange(6, 12))))
    plans.execute(plan_command(back))
    assert plans.latest is not None and plans.latest.epoch == 1  # not re-admitted


async def test_a_restarted_gateway_remembers_an_eviction_never_agreed(
    net: MemoryNetwork, tmp_path: Path
) -> None:
    """The eviction could not be agreed before the gateway stopped (no quorum): its store
    keeps it out of the restarted gateway's first plan, and it is ordered then."""
    path = tmp_path / "tasks.sqlite"
    gw = gateway(net)
    store = TaskStore(path)
    await gw.recovery.start(FACTS, store)
    gw.log.reachable = False
    await gw.recovery.evict_liars((NodeId(2),), "omitted its records")
    assert gw.log.evictions() == [] and NodeId(2) in gw.recovery.evicted
    store.close()
    await net.nodes[GATEWAY].close()

    again = gateway(net)  # a new process: nothing executed, nothing replayed yet
    store = TaskStore(path)
    await again.recovery.start(FACTS, store)
    assert 2 not in again.holders()  # a first plan over all four would give it layers
    assert again.log.evictions() == [NodeId(2)]  # ordered at last, with the stored reason
    assert again.log.plans.evicted == {NodeId(2): "omitted its records"}
    store.close()


async def test_a_gateway_with_a_lost_store_recovers_evictions_from_the_agreed_log(
    net: MemoryNetwork, tmp_path: Path
) -> None:
    """The data directory is gone; the agreed log, replayed from the other nodes, holds
    the eviction: the first plan leaves the node out and the new store records it."""
    replayed = AgreedPlans()
    replayed.execute(EvictNode(NodeId(1), "equivocated"))
    gw = gateway(net, replayed)
    store = TaskStore(tmp_path / "fresh.sqlite")
    await gw.recovery.start(FACTS, store)
    assert 1 not in gw.holders()
    assert store.evictions() == {NodeId(1): "equivocated"}
    store.close()


async def test_an_eviction_agreed_while_planning_makes_the_plan_decided_again(
    net: MemoryNetwork, tmp_path: Path
) -> None:
    """The replay of the agreed log reaches the eviction only after the gateway decided
    its first plan: every node skips that plan, and the gateway decides one without it."""
    gw = gateway(net)
    propose = gw.log.propose
    replayed = False

    async def replay_then_propose(data: bytes, timeout: float) -> int:
        nonlocal replayed
        if not replayed:  # ordered before the plan: the log as the other nodes hold it
            replayed = True
            gw.log.order(EvictNode(NodeId(3), "equivocated"), GATEWAY)
        return await propose(data, timeout)

    gw.recovery._propose = replay_then_propose
    await gw.recovery.start(FACTS)
    assert 3 not in gw.holders()  # the plan in force is the one decided again
    assert gw.log.plans.latest == gw.holder.plan
