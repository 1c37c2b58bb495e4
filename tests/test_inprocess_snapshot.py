"""A node restarted after its peers pruned the agreed log past it catches up from a state
snapshot (`protocol.pbft_snapshot`, `control.agreed_state`), in whole nodes in one
process: it cannot replay the log (its first entries are gone everywhere), so it takes
the executed state f+1 peers vouch for, continues the log from their checkpoint, and is
given a range again.

n = 4, f = 1, checkpoints every 2 agreed entries, 2 kept below them: the plans agreed
and the config change agreed while node 3 is down prune the log well past its start.
The snapshot carries the agreed suspensions too: a standby gateway caught up by one
held none, and taking over it gave a withholding node a range back at once (a review).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import SilentStageServer
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask

pytestmark = pytest.mark.timeout(120)
SETTINGS = {
    "coordination.heartbeat_interval_ms": 10,
    "coordination.pbft_checkpoint_interval": 2,
    "coordination.pbft_window": 4,
    "coordination.pbft_history": 2,
}


def holders(plan: StagePlan | None) -> set[NodeId]:
    return set() if plan is None else {*plan.nodes, *(n for n, _ in plan.replicas)}


async def test_a_node_restarted_past_the_pruned_log_catches_up_from_a_snapshot(
    tiny_model: Path, tmp_path: Path
) -> None:
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        await c.first_plan()
        c.kill(3)
        await c.until(lambda: 3 not in holders(gw.stage_server.plan), "node 3 out")
        update = asyncio.create_task(
            gw.agreement.coordinator.update({"byzantine.audit_fraction": 0.5}, reason="test")
        )
        await c.until(update.done, "a config change node 3 misses")
        update.result()
        for k in range(8):  # agreed plans node 3 misses: the log is pruned past its start
            at = gw.plans.latest.epoch if gw.plans.latest else 0
            strategy = "uniform" if k % 2 else "load_balanced"
            gw.recovery.request_replan(f"partition.strategy is now {strategy}", strategy=strategy)
            await c.until(
                lambda at=at: gw.plans.latest is not None and gw.plans.latest.epoch > at,
                f"plan {k}",
            )
        peers = gw.agreement.driver.state
        assert peers.base > 0, "the peers pruned their log: node 3 cannot replay it"
        again = await c.restart(3)
        driver = again.agreement.driver
        await c.until(
            lambda: 3 in holders(gw.stage_server.plan), "node 3 back in a plan", beats=3000
        )
        back = gw.stage_server.plan
        await c.until(lambda: again.stage_server.plan == back, "node 3 took the plan up")
        assert again.plans.latest == back  # what the log decided, though it never replayed it
        assert driver.state.base > 0  # it holds no entry from the log's start: a snapshot
        assert driver.last_executed == gw.agreement.driver.last_executed
        assert (again.role.acting, again.role.term) == (gw.role.acting, gw.role.term)
        assert again.config.record.cluster_hash == gw.config.record.cluster_hash
        assert again.config.current.byzantine.audit_fraction == 0.5  # from the snapshot


async def test_a_gateway_caught_up_by_snapshot_keeps_a_suspended_node_out(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 3 withholds its work and is suspended while the standby gateway, node 1, is
    down; plans agreed meanwhile prune the log past node 1's last entry. Node 1 restarts
    and catches up by snapshot: it holds node 3's suspension as its peers do, and when
    node 0 dies within the 30 s and node 1 takes over, node 3 stays out. Before, the
    snapshot left the suspensions out and node 1 took node 3 straight back (a review)."""
    settings = {
        **SETTINGS,
        "cluster.gateways": [0, 1],
        "network.step_timeout_ms": 500,
        "byzantine.max_step_timeouts": 1,
    }
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=settings, stage_servers={3: SilentStageServer}
    ) as c:
        gw = c.gateway
        serving = gw.gateway
        assert serving is not None
        await c.first_plan()
        await c.until(lambda: serving.scheduler is not None, "node 0 serving")
        c.kill(1)  # the standby gateway is down while node 3 is suspended
        await c.until(lambda: 1 not in holders(gw.stage_server.plan), "node 1 out")
        assert 3 in holders(gw.stage_server.plan)
        ids = tuple(TextCodec.load(tiny_model).encode("Once upon a time"))
        await c.infer(InferenceTask(RequestId("withheld"), input_ids=ids, max_new_tokens=4))
        await c.until(lambda: NodeId(3) in c.nodes[2].plans.suspended, "suspension agreed")
        suspended_at = c.clock()
        for k in range(6):  # the log is pruned past node 1's last entry
            at = gw.plans.latest.epoch if gw.plans.latest else 0
            strategy = "uniform" if k % 2 else "load_balanced"
            gw.recovery.request_replan(f"strategy {strategy}", strategy=strategy)
            await c.until(
                lambda at=at: gw.plans.latest is not None and gw.plans.latest.epoch > at,
                f"plan {k}",
            )
        assert gw.recovery.suspended(NodeId(3)) and NodeId(3) in gw.plans.suspended
        assert gw.agreement.driver.state.base > 0, "pruned: node 1 needs a snapshot"
        again = await c.restart(1)
        # applied, not executed: the protocol counts a snapshot executed once it is taken,
        # and its executor adopts it (the suspensions with it) a turn later (this test
        # failed CI in that turn)
        await c.until(
            lambda: again.agreement.driver.applied >= gw.agreement.driver.last_executed,
            "node 1 caught up",
        )
        assert again.agreement.driver.state.base > 0  # caught up from a snapshot
        assert again.plans.suspended == gw.plans.suspended == {NodeId(3): 1}
        standby = again.gateway
        assert standby is not None
        await c.until(
            lambda: all(again.membership.status(NodeId(n)) == "healthy" for n in (0, 2, 3)),
            "node 1 hears its peers",
        )
        c.kill(0)
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over", beats=1000)
        left = 30.0 - (c.clock() - suspended_at)
        assert left > 10, f"the test needs node 3's suspension still running ({left} s)"
        shown = {h.node: h for h in again.engine.health().nodes}[NodeId(3)]  # /health
        assert again.recovery.suspended(NodeId(3)) and shown.suspended_s
        assert 3 not in holders(again.stage_server.plan)
        assert NodeId(3) in again.recovery.out  # no re-plan gives it a range meanwhile
