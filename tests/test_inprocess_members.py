"""Members added and removed while the cluster runs, through the agreement, in whole nodes
in one process (`config.roster`, `protocol.pbft_members`, `control.live_config`).

n = 4, f = 1. With node 3 cut off, a fifth node is added by an agreed config change (its
key in the patch), started with the new roster, catches up from the state its peers hold
at the change, and then counts: 4 of 5 votes are a quorum only with the new node's. Node
3 comes back and catches up across the change. A member is then removed: it leaves the
plan, its frames are refused, and generation still gives the reference tokens.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from butterfly.config import ButterflyConfig
from butterfly.config.roster import add_member, remove_member
from butterfly.protocol.keys import load_or_create_key
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.errors import ButterflyError, ConfigError
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.control import StatusQuery

pytestmark = pytest.mark.timeout(120)
SETTINGS = {"coordination.heartbeat_interval_ms": 10}
PROMPT = "Once upon a time"
NEW = 8


def holders(plan: StagePlan | None) -> set[NodeId]:
    return set() if plan is None else {*plan.nodes, *(n for n, _ in plan.replicas)}


async def generated(c: InProcessCluster, name: str, model: Path) -> list[int]:
    ids = tuple(TextCodec.load(model).encode(PROMPT))
    task = InferenceTask(RequestId(name), input_ids=ids, max_new_tokens=NEW)
    return list((await c.infer(task, beats=3000)).output_ids)


async def agreed(c: InProcessCluster, patch: dict[str, Any], what: str) -> None:
    update = asyncio.create_task(c.gateway.agreement.coordinator.update(patch, reason=what))
    await c.until(update.done, what, beats=1000)
    update.result()


def newcomer(base: ButterflyConfig, data_dir: Path, address: str) -> ButterflyConfig:
    """Node 4's config: a member's agreed config with its own id, address and directory."""
    doc = base.model_dump(mode="json")
    doc["node"].update(id=4, listen=address, data_dir=str(data_dir))
    return ButterflyConfig.model_validate(doc)


async def answers(c: InProcessCluster, node: int) -> bool:
    """Whether `node` answers the gateway's status query."""
    try:
        await c.net.nodes[NodeId(0)].ask(NodeId(node), StatusQuery(), timeout=0.3)
    except ButterflyError:
        return False
    return True


def refused(c: InProcessCluster) -> float:
    """Frames the gateway dropped because their sender is no member."""
    text = c.gateway.metrics.render().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("reason") == "handshake_refused":
                return sample.value
    return 0.0


async def test_a_member_is_added_and_one_removed_while_the_cluster_serves(
    tiny_model: Path, tmp_path: Path
) -> None:
    codec = TextCodec.load(tiny_model)
    expected = list(
        generate([load_stage(tiny_model)], codec.encode(PROMPT), NEW, stop_ids=codec.eos_ids)
    )
    async with InProcessCluster(tiny_model, 4, tmp_path / "cluster", f=1, settings=SETTINGS) as c:
        gw = c.gateway
        await c.first_plan()

        c.kill(3)  # down across the change: it catches up on it afterwards
        await c.until(lambda: 3 not in holders(gw.stage_server.plan), "node 3 out of the plan")

        # add node 4: its key is in the agreed change, so every node trusts it from then on
        key = load_or_create_key(tmp_path / "node-4" / "node.key")
        address = "127.0.0.1:9904"
        await agreed(c, add_member(gw.config.current, address, key.public.hex()), "add node 4")
        up = c.nodes[:3]
        await c.until(
            lambda: all(n.agreement.driver.state.config.n == 5 for n in up),
            "every node up in the new replica set",
        )
        for node in up:
            assert node.agreement.driver.state.config.epoch == 5  # 5 slots, no tombstone
            assert node.config.current.cluster.members[4] == address
        joined = c.join(newcomer(gw.config.current, tmp_path / "node-4", address))
        driver = joined.agreement.driver
        await c.until(
            lambda: driver.last_executed >= gw.agreement.driver.state.config.start,
            "node 4 caught up from its peers' state at the change",
        )
        await c.until(lambda: joined.plans.latest == gw.plans.latest, "node 4 holds the plan")
        assert joined.config.record.cluster_hash == gw.config.record.cluster_hash

        # node 3 still down: 4 of 5 is PBFT's and PREPARE's quorum, reached only with node 4
        await agreed(c, {"byzantine.audit_fraction": 0.5}, "a change node 4 votes for")
        assert joined.config.current.byzantine.audit_fraction == 0.5
        assert await generated(c, "with-node-4", tiny_model) == expected

        # node 3 back: relayed the change by its peers' old replicas, it makes it too
        c.revive(3)
        late = c.nodes[3]
        # the replica counts a command executed a loop turn before the node applies it, so
        # the change itself is what is waited for
        await c.until(
            lambda: (
                late.agreement.driver.last_executed == gw.agreement.driver.last_executed
                and late.config.current.byzantine.audit_fraction == 0.5
            ),
            "node 3 caught up across the change and made it",
        )
        assert late.agreement.driver.state.config.members == (0, 1, 2, 3, 4)

        # remove a plan member that is not gateway-capable: out of the plan and the
        # quorums, its frames refused
        victim = next(n for n in (2, 4) if n in holders(gw.stage_server.plan))
        assert await answers(c, victim)
        await agreed(c, remove_member(gw.config.current, NodeId(victim)), "remove a member")
        await c.until(lambda: victim not in holders(gw.stage_server.plan), "it left the plan")
        config = gw.agreement.driver.state.config
        assert victim not in config.members and (config.n, config.epoch) == (4, 6)
        assert not await answers(c, victim)  # the gateway no longer talks to it ...
        before = refused(c)
        await c.net.nodes[NodeId(victim)].send(NodeId(0), StatusQuery(), channel="control")
        await c.until(lambda: refused(c) > before, "its frame refused")  # ... nor listens
        assert NodeId(victim) not in gw.recovery.facts
        assert await generated(c, "after-removal", tiny_model) == expected

        # a restart resumes the agreed roster from the node's history (its file lists
        # four members): it rejoins in the current epoch; the removed node cannot restart
        again = await c.restart(3)
        assert again.config.current.cluster.members[victim] == ""
        await c.until(
            lambda: again.agreement.driver.last_executed == gw.agreement.driver.last_executed,
            "node 3 caught up after its restart",
        )
        assert again.agreement.driver.state.config.members == config.members
        with pytest.raises(ConfigError, match="was removed from the cluster"):
            await c.restart(victim)


async def test_a_standby_gateway_is_removed_and_the_gateway_set_shrinks(
    tiny_model: Path, tmp_path: Path
) -> None:
    """n = 5, f = 1, gateways 0 (acting) and 1 (standby, the default set). Removing node 1
    is agreed: every node's gateway set becomes (0,), the acting gateway copies tasks to
    no one, `/health`'s `gateways` lists node 0 alone, and tasks still run (the acting gateway
    itself is never removed: tests/test_roster.py)."""
    codec = TextCodec.load(tiny_model)
    expected = list(
        generate([load_stage(tiny_model)], codec.encode(PROMPT), NEW, stop_ids=codec.eos_ids)
    )
    async with InProcessCluster(tiny_model, 5, tmp_path / "cluster", f=1, settings=SETTINGS) as c:
        gw = c.gateway
        assert gw.gateway is not None
        await c.first_plan()
        assert all(n.role.gateways == (0, 1) for n in c.nodes)
        standby = gw.gateway.replicas
        await c.until(lambda: standby.standbys() == [NodeId(1)], "node 1 a live standby")

        await agreed(c, remove_member(gw.config.current, NodeId(1)), "remove standby 1")
        others = [c.nodes[i] for i in (0, 2, 3, 4)]
        await c.until(lambda: all(n.role.gateways == (0,) for n in others), "gateways (0,)")
        assert standby.standbys() == []  # accepted tasks are copied to no removed node
        assert [g["node"] for g in gw.gateway.gateways()] == [0]
        assert await generated(c, "after-removing-a-gateway", tiny_model) == expected
