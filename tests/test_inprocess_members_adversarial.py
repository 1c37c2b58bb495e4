"""Membership changes under attack and under load, in whole nodes in one process
(`config.roster`, `agreement.config_replica`, `protocol.pbft_members`).

n = 5, f = 1 (nodes 0 and 1 gateway-capable). A member that is not the acting gateway
cannot start a roster change (no node votes on its PREPARE, its own agreement refuses
the command); an addition with another member's key, a key that is no curve point, or
an address in use is refused with the reason, and nothing changes; a generation that
runs while one of its plan's nodes is removed finishes with the reference tokens, nobody
is evicted, and the idle fifth node takes the removed one's copy; 4 live members are the
limit for f = 1, so the next removal is refused; the acting gateway restarted right
after the change resumes it and serves; a rollback to before the removal keeps the
roster.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from butterfly.config.proposal import propose_update
from butterfly.config.roster import add_member, remove_member
from butterfly.config.versions import canonical_json
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.errors import ButterflyError, SendTimeout
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.commands import ConfigUpdate, encode_command
from butterfly.types.wire.control import ConfigPrepare

pytestmark = pytest.mark.timeout(180)
SETTINGS = {"coordination.heartbeat_interval_ms": 10}
PROMPT = "Once upon a time"
NEW = 24


def holders(plan: StagePlan | None) -> set[NodeId]:
    return set() if plan is None else {*plan.nodes, *(n for n, _ in plan.replicas)}


async def refusal(c: InProcessCluster, patch: dict[str, Any], what: str) -> str:
    """The gateway's config update of `patch`, which must fail: its message."""
    update = asyncio.create_task(c.gateway.agreement.coordinator.update(patch, reason=what))
    await c.until(update.done, what, beats=1000)
    error = update.exception()
    assert error is not None, f"{what} was applied"
    return str(error)


async def test_membership_changes_refused_and_one_made_under_load(
    tiny_model: Path, tmp_path: Path
) -> None:
    codec = TextCodec.load(tiny_model)
    ids = codec.encode(PROMPT)
    expected = list(generate([load_stage(tiny_model)], ids, NEW, stop_ids=codec.eos_ids))
    async with InProcessCluster(tiny_model, 5, tmp_path / "cluster", f=1, settings=SETTINGS) as c:
        gw = c.gateway
        await c.first_plan()
        start = gw.config.current
        hash0 = gw.config.record.cluster_hash

        # a member that is not the acting gateway asks for votes on adding a second
        # identity of its own: no node votes on it
        mine = SigningKey.from_seed(b"\x07" * 32).public.hex()
        liar = c.nodes[3]
        own = propose_update(start, add_member(start, "127.0.0.1:9955", mine), reason="mine")
        body = canonical_json(own.to_wire())
        for peer in (0, 1, 2, 4):  # the router drops it: no vote, signed or not, comes back
            with pytest.raises(SendTimeout):
                await c.net.nodes[NodeId(3)].ask(
                    NodeId(peer), ConfigPrepare(own.digest), body, timeout=0.3, channel="control"
                )

        # ... and its own agreement refuses the command before ordering it
        forged = ConfigUpdate(body, 1, 1, (NodeId(3),), (0,), (b"",))
        with pytest.raises(ButterflyError, match="gateway"):
            await liar.agreement.driver.propose(encode_command(forged), timeout=1.0)

        # refused additions name the problem, and nothing is applied anywhere
        used = start.cluster.members[2]
        other = start.cluster.public_keys[2]
        reasons = {
            "same key": await refusal(c, add_member(start, "127.0.0.1:9956", other), "dup key"),
            "bad key": await refusal(
                c, add_member(start, "127.0.0.1:9957", "ff" * 31 + "7f"), "bad key"
            ),
            "address": await refusal(c, add_member(start, used, mine), "address in use"),
        }
        assert "key" in reasons["same key"] and "twice" in reasons["same key"], reasons
        assert "Ed25519" in reasons["bad key"], reasons
        assert used in reasons["address"], reasons
        for node in c.nodes:
            assert node.config.record.cluster_hash == hash0
            assert node.agreement.driver.state.config.n == 5

        # a generation runs while one of its plan's nodes is removed
        victim = next(n for n in (4, 3, 2) if n in holders(gw.stage_server.plan))
        tokens: list[int] = []
        task = InferenceTask(RequestId("across"), input_ids=tuple(ids), max_new_tokens=NEW)
        running = asyncio.create_task(gw.engine.run(task, lambda t: tokens.append(1)))
        await c.until(lambda: len(tokens) >= 3, "a few tokens before the change", beats=3000)
        assert not running.done()
        removal = asyncio.create_task(
            gw.agreement.coordinator.update(remove_member(start, NodeId(victim)), reason="rm")
        )
        await c.until(lambda: running.done() and removal.done(), "both done", beats=4000)
        removal.result()
        assert list(running.result().output_ids) == expected
        # the idle member takes the removed standby's copy: every range keeps 2 holders
        await c.until(lambda: victim not in holders(gw.stage_server.plan), "it left the plan")
        plan = gw.stage_server.plan
        assert plan is not None and all(len(plan.holders(r)) >= 2 for _, r in plan.stages)
        assert victim not in gw.recovery.failed | gw.recovery.out  # removed, not failed
        for node in c.nodes:
            if node.id != victim:
                assert node.plans.evicted == {}  # nobody blamed for the change
                assert node.agreement.driver.state.config.n == 4

        # 4 live members are f = 1's limit: removing one more is refused by every node
        now = gw.config.current
        last = next(n for n in (4, 3, 2) if n != victim)
        reason = await refusal(c, remove_member(now, NodeId(last)), "past the limit")
        assert "3f+1" in reason, reason
        assert gw.agreement.driver.state.config.n == 4

        # the acting gateway restarts right after the change: it resumes the agreed roster
        # from its history, rejoins the current epoch, and serves and agrees again
        config = gw.agreement.driver.state.config
        others = [n for n in c.nodes if n.id not in (0, victim)]
        gw = await c.restart(0)
        assert gw.config.current.cluster.members[victim] == ""
        await c.until(
            lambda: gw.agreement.driver.last_executed == others[0].agreement.driver.last_executed,
            "the gateway caught up after its restart",
        )
        assert gw.agreement.driver.state.config.members == config.members
        assert gw.agreement.driver.state.config.epoch == config.epoch
        await c.until(lambda: gw.stage_server.plan is not None, "the gateway holds the plan")
        assert NodeId(victim) not in holders(gw.stage_server.plan)
        update = asyncio.create_task(
            c.gateway.agreement.coordinator.update({"byzantine.audit_fraction": 0.5}, reason="x")
        )
        await c.until(update.done, "a change after the restart", beats=1000)
        update.result()
        assert all(n.config.current.byzantine.audit_fraction == 0.5 for n in others)
        again = InferenceTask(RequestId("after"), input_ids=tuple(ids), max_new_tokens=NEW)
        running = asyncio.create_task(gw.engine.run(again, lambda t: None))
        await c.until(running.done, "a request after the restart", beats=3000)
        assert list(running.result().output_ids) == expected

        # a rollback to a version from before the removal restores that version's
        # settings, not its roster: ids never move, a removed member is added again anew
        first = gw.config.history.versions()[-1]  # as the node first started
        assert first.cluster_hash == hash0
        rollback = asyncio.create_task(gw.agreement.coordinator.rollback(first.version))
        await c.until(rollback.done, "the rollback", beats=1000)
        assert [c.key for c in rollback.result().changes] == ["byzantine.audit_fraction"]
        for node in [gw, *others]:
            assert node.config.current.byzantine.audit_fraction == start.byzantine.audit_fraction
            assert node.config.current.cluster.members[victim] == ""
            assert node.agreement.driver.state.config.epoch == config.epoch
