"""A member that orders commands not its own, in whole nodes (butterfly.testing.inprocess).

Node 1 is the agreement's first primary and a `UsurpingDriver`: besides voting honestly it
orders the eviction of an honest node, its own eviction (to leave on its own terms before
the gateway convicts it), a plan holding it alone and a config change, pre-preparing and
committing each itself. No node executes any of them; the gateway's eviction of node 1,
with its proof, is agreed on every node and node 1 leaves the plan; no honest node is
evicted. tests/test_agreement_authority.py covers the same at the level of the drivers.
Then an eviction outlives a restart of the gateway.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from butterfly.control.plans import plan_command
from butterfly.schedule.store import TaskStore
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liar_votes import UsurpingDriver
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.commands import ConfigUpdate, EvictNode, encode_command

pytestmark = pytest.mark.timeout(60)
SETTINGS = {
    "coordination.heartbeat_interval_ms": 10,
    # a view change replaces the lying primary; its timers run on the real clock
    "coordination.view_change_timeout_ms": 300,
    "coordination.phase_timeout_ms": 300,
}
PROOF = "signed a result that contradicts the re-execution"


async def test_a_members_commands_never_take_effect(tiny_model: Path, tmp_path: Path) -> None:
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=SETTINGS, agreements={1: UsurpingDriver}
    ) as c:
        gw = c.gateway
        first = await c.first_plan()
        assert first is not None and 1 in {*first.nodes, *(n for n, _ in first.replicas)}
        liar = c.nodes[1].agreement.driver
        assert isinstance(liar, UsurpingDriver) and liar.primary == 1
        config_before = [n.config.record.cluster_hash for n in c.nodes]
        alone = StagePlan(Epoch(first.epoch + 1), ((NodeId(1), LayerRange(0, 2**20)),))
        for command in (
            EvictNode(NodeId(2), "honest node 2"),
            EvictNode(NodeId(1), "leaving for maintenance"),
            plan_command(alone),
            ConfigUpdate(b"{}", 1, 7, (NodeId(1),), (0,), (b"s" * 64,)),
        ):
            liar.usurp(encode_command(command))

        await gw.recovery.evict_liars((NodeId(1),), PROOF)

        def out_everywhere() -> bool:
            plan = gw.stage_server.plan
            if plan is None or 1 in {*plan.nodes, *(n for n, _ in plan.replicas)}:
                return False
            return all(n.plans.latest == plan for n in c.nodes if n.id != 1)

        await c.until(out_everywhere, "node 1 out of the agreed plan")
        for node in c.nodes:  # the liar's replica executes what the others do
            assert node.plans.evicted == {NodeId(1): PROOF}  # no honest node, no own reason
            assert node.plans.latest != alone
        assert [n.config.record.cluster_hash for n in c.nodes] == config_before
        assert gw.recovery.evicted == {NodeId(1)}


async def test_an_eviction_survives_a_gateway_restart(tiny_model: Path, tmp_path: Path) -> None:
    """The gateway evicts node 3, then restarts (a new process over the same data
    directory): its store holds the eviction, its first plan leaves node 3 out, and
    every node still records the one agreed eviction."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        await c.first_plan()
        await gw.recovery.evict_liars((NodeId(3),), PROOF)
        await c.until(lambda: all(NodeId(3) in n.plans.evicted for n in c.nodes), "agreed")

        again = await c.restart(0)
        assert again is not gw and again.plans.evicted == {}  # nothing replayed yet

        def planned() -> bool:
            plan = again.stage_server.plan
            return plan is not None and all(n.plans.latest == plan for n in c.nodes)

        await c.until(planned, "the restarted gateway's plan agreed everywhere")
        plan = again.stage_server.plan
        assert plan is not None and 3 not in {*plan.nodes, *(n for n, _ in plan.replicas)}
        assert NodeId(3) in again.recovery.evicted
        for node in c.nodes:
            assert node.plans.evicted == {NodeId(3): PROOF}
        store = TaskStore(Path(again.config.current.node.data_dir) / "tasks.sqlite")
        assert store.evictions() == {NodeId(3): PROOF}
        store.close()
