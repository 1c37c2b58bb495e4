"""A node restarted after its peers pruned the agreed log past it catches up from a state
snapshot (`protocol.pbft_snapshot`, `control.agreed_state`), in whole nodes in one
process: it cannot replay the log (its first entries are gone everywhere), so it takes
the executed state f+1 peers vouch for, continues the log from their checkpoint, and is
given a range again.

n = 4, f = 1, checkpoints every 2 agreed entries, 2 kept below them: the plans agreed
and the config change agreed while node 3 is down prune the log well past its start.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import NodeId
from butterfly.types.plan import StagePlan

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
