"""Membership that heals, in whole nodes in one process (butterfly.testing.inprocess).

n = 4, f = 1: chain 0 -> 1, standbys 2 and 3. A node that leaves the plan (killed: cut
off; or never started) is taken back once its heartbeats have been steady for its hold:
the gateway agrees a plan that gives it a range again, and audits run again over every
range. An evicted liar that comes back is never taken back. tests/test_recovery.py keeps
the same covered with real processes (kill -9, then a restart from the config).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from butterfly.control.facts import NodeFacts
from butterfly.control.policy import RESTARTS_FORGOTTEN_S, SUSPENSION_MAX_S, suspension_s
from butterfly.dataplane.stage_server import StageServer
from butterfly.node import Node
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import BeatHub, InProcessCluster
from butterfly.testing.liars import SilentStageServer, WithholdingStageServer
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.control import PlanAck, PlanAssign

pytestmark = pytest.mark.timeout(90)
SETTINGS = {"coordination.heartbeat_interval_ms": 10}
PROMPT = "Once upon a time"
NEW = 12


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> list[int]:
    codec = TextCodec.load(tiny_model)
    stage = load_stage(tiny_model)
    return list(generate([stage], codec.encode(PROMPT), NEW, stop_ids=codec.eos_ids))


def task(model: Path, name: str) -> InferenceTask:
    ids = tuple(TextCodec.load(model).encode(PROMPT))
    return InferenceTask(RequestId(name), input_ids=ids, max_new_tokens=NEW)


def holders(plan: StagePlan | None) -> set[NodeId]:
    return set() if plan is None else {*plan.nodes, *(n for n, _ in plan.replicas)}


def every_range_checked(plan: StagePlan | None) -> bool:
    """Every range of the chain on two holders: what an audit with f = 1 needs."""
    return plan is not None and all(len(plan.holders(r)) >= 2 for _, r in plan.stages)


async def run(c: InProcessCluster, t: InferenceTask) -> tuple[list[int], str]:
    result = await c.infer(t, beats=3000)
    return list(result.output_ids), result.verified


async def test_a_killed_node_that_comes_back_is_given_a_range_and_audits_resume(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        first = await c.first_plan()
        assert first is not None and first.nodes == (0, 1)
        # killed mid-request: its cache of the request stays behind
        result = await c.infer_killing(task(tiny_model, "killed-in"), 1, at=5)
        assert list(result.output_ids) == expected
        assert result.verified == "audit"  # one holder left: the gateway re-executes it
        promoted = gw.stage_server.plan
        assert promoted is not None and promoted.nodes == (0, 3)
        assert not every_range_checked(promoted)
        node1 = c.nodes[1]
        assert RequestId("killed-in") in node1.stage_server.caches  # stale: moved on

        c.revive(1)  # it kept running, cut off: it thawed with its old stage and caches
        await c.until(lambda: 1 in holders(gw.stage_server.plan), "node 1 back in a plan")
        back = gw.stage_server.plan
        assert back is not None and back.epoch > promoted.epoch
        assert back.nodes == promoted.nodes  # it joined as a standby: nothing else moved
        assert every_range_checked(back)
        await c.until(lambda: node1.stage_server.plan == back, "node 1 took the plan up")
        assert node1.plans.latest == back  # it caught up on the agreed log
        assert node1.stage_server.caches == {}  # the request moved on without it
        assert NodeId(1) not in gw.recovery.out and NodeId(1) not in gw.recovery.failed
        assert await run(c, task(tiny_model, "after")) == (expected, "audit")


@pytest.mark.parametrize("victim", [3, 1])
async def test_a_restarted_node_catches_up_and_is_given_a_range(
    tiny_model: Path, tmp_path: Path, expected: list[int], victim: int
) -> None:
    """Killed, then started again from its config and data directory: a new node with
    no plan and no caches, which replays the agreed log from its peers. Node 3 is a
    standby; node 1 a chain node and the agreement's first primary, whose pre-prepares
    only it signed: its peers relay them back to it (`pbft.OWN_RELAYED`), or it would
    never execute the log, refuse every plan, and draw ever more relays."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        await c.first_plan()
        c.kill(victim)
        await c.until(lambda: victim not in holders(gw.stage_server.plan), "victim out")
        again = await c.restart(victim)
        assert again.stage_server.plan is None and again.plans.latest is None
        await c.until(lambda: victim in holders(gw.stage_server.plan), "victim back in a plan")
        back = gw.stage_server.plan
        await c.until(lambda: again.stage_server.plan == back, "the victim took the plan up")
        assert again.plans.latest == back
        assert again.agreement.driver.last_executed == gw.agreement.driver.last_executed
        assert every_range_checked(back)
        assert await run(c, task(tiny_model, "after-restart")) == (expected, "audit")


PAUSE_TOLERATED = {
    **SETTINGS,
    "coordination.acceptable_pause_ms": 10_000,  # a restart never reads as a failure
    "network.step_timeout_ms": 500,
}


async def restart_unseen(c: InProcessCluster, node: int) -> Node:
    """Kill `node` for 5 s and start it again from its config, all within the failure
    detector's tolerance: the gateway never sees it fail, only its heartbeats come back
    without the layers it had taken up (none: a new process holds no plan)."""
    gw = c.gateway
    c.kill(node)
    for _ in range(50):
        c.hub.tick(0.1)
        await asyncio.sleep(0.002)
    assert gw.membership.status(NodeId(node)) == "healthy"  # within acceptable_pause_ms
    return await c.restart(node)


async def rejoined(c: InProcessCluster, again: Node) -> StagePlan:
    """The plan in force once the restarted node holds it, as the gateway does."""
    await c.until(
        lambda: (
            again.stage_server.plan is not None
            and again.stage_server.plan == c.gateway.stage_server.plan
        ),
        "the restarted node took the gateway's plan up",
    )
    plan = again.stage_server.plan
    assert plan is not None and again.id in holders(plan)
    return plan


async def test_a_node_restarted_unseen_by_the_failure_detector_rejoins_unsuspended(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """Chain node 1 restarts within `coordination.acceptable_pause_ms`: no failure is
    seen, but its heartbeats say it holds none of the layers it acknowledged, so it
    leaves the plan as a failed node does and comes back after its hold. Before, the
    gateway kept sending it steps it dropped (it held no plan), and suspended the honest
    node for 30 s as withholding, a strike against it (a review)."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=PAUSE_TOLERATED) as c:
        gw = c.gateway
        first = await c.first_plan()
        serving = gw.gateway
        assert serving is not None
        await c.until(lambda: serving.scheduler is not None, "node 0 serving")
        assert NodeId(1) in first.nodes
        again = await restart_unseen(c, 1)
        assert await run(c, task(tiny_model, "after-restart")) == (expected, "audit")
        back = await rejoined(c, again)
        assert not gw.recovery.suspended(NodeId(1)) and NodeId(1) not in gw.recovery._suspensions
        assert not any(NodeId(1) in n.plans.suspended for n in c.nodes)
        assert every_range_checked(back)
        assert await run(c, task(tiny_model, "after-rejoin")) == (expected, "audit")


async def test_a_node_that_restarts_again_soon_is_suspended(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A node's heartbeats are its own word: a withholder could claim a restart each
    time it was about to be charged and never be suspended. The first restart in
    `RESTARTS_FORGOTTEN_S` is free; the next is suspended like unanswered work."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=PAUSE_TOLERATED) as c:
        gw = c.gateway
        await c.first_plan()
        serving = gw.gateway
        assert serving is not None
        await c.until(lambda: serving.scheduler is not None, "node 0 serving")  # acked
        again = await restart_unseen(c, 1)
        await rejoined(c, again)
        assert not gw.recovery.suspended(NodeId(1))
        await restart_unseen(c, 1)
        await c.until(lambda: gw.recovery.suspended(NodeId(1)), "node 1 suspended")
        await c.until(lambda: 1 not in holders(gw.stage_server.plan), "node 1 out")
        await c.until(lambda: all(NodeId(1) in n.plans.suspended for n in c.nodes), "agreed")
        assert RESTARTS_FORGOTTEN_S >= 2 * SUSPENSION_MAX_S
        assert not any(node.plans.evicted for node in c.nodes)


PAUSING: list[BeatHub] = []  # the hub of the cluster whose node 2 pauses on loading


class PausingOnLoad(StageServer):
    """An honest stage server whose process pauses (its heartbeats too) as it has taken
    the first plan up, until the test ends the pause."""

    async def apply_plan(self, msg: PlanAssign) -> PlanAck:
        ack = await super().apply_plan(msg)
        if msg.epoch == 1 and PAUSING:  # no await since it applied: its last beat said none
            PAUSING[0].silent.add(self.node)
        return ack


async def test_an_honest_node_whose_beats_lag_past_its_ack_is_not_taken_out(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 2 pauses 0.5 s (busy after loading its layers, well within
    `coordination.acceptable_pause_ms`) right after it acknowledged the first plan: the
    last heartbeat the gateway has from it, sent before it applied the plan, says no
    layers. Taken for its word, the honest node was let go as restarted, taken back
    after its hold (the pause still on), "restarted" again and suspended for 30 s (a
    review). Only heartbeats that arrived after its ack count."""
    settings = {**SETTINGS, "coordination.acceptable_pause_ms": 2000}
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=settings, stage_servers={2: PausingOnLoad}
    ) as c:
        PAUSING[:] = [c.hub]
        try:
            gw, node2 = c.gateway, c.nodes[2]
            await c.until(
                lambda: node2.stage_server.plan is not None and node2.stage_server.plan.epoch == 1,
                "node 2 took the first plan up",
            )
            plan = node2.stage_server.plan
            assert plan is not None and plan.layers_of(NodeId(2)) is not None
            for _ in range(250):  # every holder's ack in (real time; no fake time passes)
                if gw.recovery._acked == 1:
                    break
                await asyncio.sleep(0.02)
            assert gw.recovery._acked == 1, "setup: the first plan was not acknowledged"
            assert gw.membership.layers_of(NodeId(2)) is None  # its last beat: before it loaded
            for _ in range(5):  # a pause of 0.5 s (fake time): no beat meanwhile
                c.hub.tick(0.1)
                await asyncio.sleep(0.05)
                assert gw.membership.status(NodeId(2)) != "failed"  # the detector tolerates it
            c.hub.silent.discard(NodeId(2))  # the pause is over: it beats its layers again
            for _ in range(20):
                c.hub.tick(0.1)
                await asyncio.sleep(0.01)
            assert gw.membership.layers_of(NodeId(2)) == plan.layers_of(NodeId(2))
            assert NodeId(2) not in gw.recovery._restarts, "the honest node taken out as restarted"
            assert not gw.recovery.suspended(NodeId(2))
            assert not any(NodeId(2) in n.plans.suspended for n in c.nodes)
            assert gw.stage_server.plan is not None and gw.stage_server.plan.epoch == 1
        finally:
            PAUSING.clear()


async def test_an_evicted_node_that_comes_back_stays_out(tiny_model: Path, tmp_path: Path) -> None:
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        await c.first_plan()
        c.kill(2)
        await gw.recovery.evict_liars((NodeId(2),), "signed a wrong result")
        await c.until(lambda: 2 not in holders(gw.stage_server.plan), "node 2 out of the plan")
        c.revive(2)
        out_since = gw.stage_server.plan
        # well past its hold (5 beats of 10 ms) with steady heartbeats
        for _ in range(50):
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        assert gw.membership.status(NodeId(2)) == "healthy"
        assert gw.stage_server.plan == out_since
        assert 2 not in holders(gw.stage_server.plan)


async def test_the_cluster_starts_with_a_member_down_and_takes_it_in_when_it_starts(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """n - f = 3 of 4 nodes up: the first plan goes over them after a short wait for
    node 3 (100 heartbeat intervals, 1 s here), and the cluster serves; when node 3
    starts, a plan of two stages with a standby each takes it in."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS, absent={3}) as c:
        gw = c.gateway
        await c.until(lambda: gw.stage_server.plan is not None, "the first plan", beats=2000)
        first = gw.stage_server.plan
        assert first is not None and 3 not in holders(first)
        assert NodeId(3) in gw.recovery.out
        tokens, _ = await run(c, task(tiny_model, "three-up"))
        assert tokens == expected

        c.start(3)
        await c.until(lambda: 3 in holders(gw.stage_server.plan), "node 3 in a plan")
        plan = gw.stage_server.plan
        assert plan is not None and len(plan.nodes) == 2 and every_range_checked(plan)
        await c.until(
            lambda: all(c.nodes[n].stage_server.plan == plan for n in holders(plan)),
            "every holder took the plan up",
        )
        assert await run(c, task(tiny_model, "four-up")) == (expected, "audit")


async def test_a_member_withholding_its_ack_does_not_hold_up_recovery(
    tiny_model: Path, tmp_path: Path, expected: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """Node 2 (the standby of node 0's range) takes the first plan up, then acks no plan
    while heartbeating. When chain node 1 dies, the promotion keeps node 2's layers, so
    its ack is owed at once; it is out of that plan after 100 heartbeat intervals and the
    next plan goes without it, instead of waiting the 300 s a loading node may take. It
    comes back after its hold and is out again each time (with a doubling hold)."""
    async with InProcessCluster(
        tiny_model,
        4,
        tmp_path,
        f=1,
        settings=SETTINGS,
        stage_servers={2: WithholdingStageServer},
    ) as c:
        gw = c.gateway
        await c.first_plan()
        c.kill(1)

        def withheld() -> bool:
            return "nodes [2] did not take up epoch" in caplog.text

        await c.until(withheld, "node 2 out for withholding its ack", beats=2000)
        assert gw.membership.status(NodeId(2)) == "healthy"  # out for withholding alone
        tokens, _ = await run(c, task(tiny_model, "past-a-withholder"))
        assert tokens == expected
        plan = gw.stage_server.plan
        assert plan is not None and 1 not in holders(plan)


async def test_a_gateway_left_out_of_the_plan_still_holds_it_and_serves(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """Node 0 reports too little memory for any layer, so placement leaves it out; it
    must still hold the plan it routes by (it once never applied one, and every request
    got 503)."""
    tiny_memory = NodeFacts(flops_per_s=1e11, memory_bytes=1)
    async with InProcessCluster(
        tiny_model, 2, tmp_path, f=0, settings=SETTINGS, facts={0: tiny_memory}
    ) as c:
        gw = c.gateway
        await c.until(lambda: gw.stage_server.plan is not None, "the gateway holds a plan")
        plan = gw.stage_server.plan
        assert plan is not None and plan.nodes == (1,) and gw.stage_server.stage is None
        tokens, _ = await run(c, task(tiny_model, "gateway-without-a-stage"))
        assert tokens == expected


async def test_a_re_plan_waiting_on_a_node_that_dies_starts_over_at_once(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """n = 5, f = 0 (a quorum of 3, so two crashes leave one standing): node 1 dies; the
    next plan moves layers to node 2, which never acks it (a load that hangs; loading may
    take 300 s, so it is waited for). Node 2 then dies too: the wait ends at once and a
    plan of the three left serves."""
    async with InProcessCluster(
        tiny_model,
        5,
        tmp_path,
        f=0,
        settings={**SETTINGS, "partition.strategy": "uniform"},
        stage_servers={2: WithholdingStageServer},
    ) as c:
        gw = c.gateway
        first = await c.first_plan()
        assert first is not None and {1, 2} <= set(first.nodes)
        c.kill(1)

        def loading() -> bool:  # the plan without node 1 is in force here, node 2 loads
            plan = gw.stage_server.plan
            return plan is not None and plan != first and 2 in plan.nodes

        await c.until(loading, "a plan without node 1, with node 2")
        assert 1 not in holders(gw.stage_server.plan)
        assert c.nodes[2].stage_server.plan == first  # it never took the new one up
        c.kill(2)
        await c.until(lambda: holders(gw.stage_server.plan) <= {0, 3, 4}, "the three left")
        tokens, _ = await run(c, task(tiny_model, "after-two-deaths"))
        assert tokens == expected


async def test_a_strategy_change_is_a_new_epoch_even_when_the_ranges_stay(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A plan a returning node would not change is skipped (`only_if_changed`); one asked
    for by a changed strategy never is: every node then holds a plan of the new
    strategy, agreed for a new epoch (tests/test_config_cluster.py waits for it)."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        first = await c.first_plan()
        assert first is not None
        for strategy in ("uniform", "load_balanced"):
            before = gw.stage_server.plan
            assert before is not None
            at = before.epoch
            gw.recovery.request_replan(f"partition.strategy is now {strategy}", strategy=strategy)
            await c.until(
                lambda at=at: (p := gw.stage_server.plan) is not None and p.epoch > at,
                f"a plan by {strategy}",
            )
            placement = gw.recovery.placement
            assert placement is not None and str(placement.plan.strategy) == strategy
        last = gw.stage_server.plan
        assert last is not None and last.epoch == first.epoch + 2
        assert (last.stages, last.replicas) == (first.stages, first.replicas)  # ranges stayed


async def test_a_node_cut_off_over_tcp_is_suspended_and_taken_back_after_its_hold(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """Node 1's connections are cut while its heartbeats still arrive (a TCP cut, a
    firewall that lost its state): its steps time out and it leaves the plan for
    `SUSPENSION_S`, not for good (nothing proves it lied; a review's honest node behind
    such a cut was evicted for good). Healed, it is taken back after its hold; nobody is
    evicted. A second suspension in a row holds it twice as long."""
    quick = {**SETTINGS, "network.step_timeout_ms": 500, "byzantine.max_step_timeouts": 1}
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=quick) as c:
        gw = c.gateway
        serving = gw.gateway
        assert serving is not None
        await c.until(lambda: serving.scheduler is not None, "node 0 serving")  # re-planning
        assert 1 in holders(gw.stage_server.plan)
        c.net.blackholed.add(NodeId(1))  # frames only: the hub still carries its heartbeats
        assert await run(c, task(tiny_model, "past-the-cut")) == (expected, "audit")
        await c.until(lambda: gw.recovery.suspended(NodeId(1)), "node 1 suspended")
        await c.until(lambda: 1 not in holders(gw.stage_server.plan), "node 1 out")
        assert gw.membership.status(NodeId(1)) == "healthy"
        shown = {h.node: h for h in gw.engine.health().nodes}[NodeId(1)]  # as /health says
        assert not shown.evicted and shown.suspended_s is not None and shown.suspended_s > 20
        c.net.blackholed.discard(NodeId(1))
        hold = suspension_s(1) / 0.1  # beats of 100 ms of the hub's clock
        for _ in range(int(hold * 0.9)):  # not before its hold
            c.hub.tick(0.1)
            await asyncio.sleep(0.001)
        assert 1 not in holders(gw.stage_server.plan)
        await c.until(lambda: 1 in holders(gw.stage_server.plan), "node 1 taken back")
        assert not gw.recovery.suspended(NodeId(1))
        assert {h.node: h for h in gw.engine.health().nodes}[NodeId(1)].suspended_s is None
        # the agreed plan that took it back ended its agreed suspension on every node, so
        # no gateway taking over later keeps it out again (by wall clock, one whose clock
        # ran ahead did: a review)
        await c.until(lambda: all(NodeId(1) not in n.plans.suspended for n in c.nodes), "over")
        assert not any(node.plans.evicted for node in c.nodes)
        assert await run(c, task(tiny_model, "healed")) == (expected, "audit")
        assert suspension_s(2) == 2 * suspension_s(1)


async def test_a_gateway_that_takes_over_keeps_a_suspended_node_out(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """Node 3 withholds its work: node 0 suspends it, and its suspension is agreed. Node
    0 then dies and node 1 takes over: node 3 stays out for what is left of it. Kept in
    node 0's memory alone, node 1's first plan gave node 3 a range again (a review)."""
    settings = {
        **SETTINGS,
        "cluster.gateways": [0, 1],
        "network.step_timeout_ms": 500,
        "byzantine.max_step_timeouts": 1,
    }
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=settings, stage_servers={3: SilentStageServer}
    ) as c:
        first, standby = c.nodes[0].gateway, c.nodes[1].gateway
        assert first is not None and standby is not None
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert 3 in holders(c.gateway.stage_server.plan)
        assert await run(c, task(tiny_model, "past-a-withholder")) == (expected, "audit")
        await c.until(lambda: NodeId(3) in c.nodes[1].plans.suspended, "suspension agreed")
        c.kill(0)
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over", beats=1000)
        assert c.nodes[1].recovery.suspended(NodeId(3))
        for _ in range(150):  # 15 s of the hub's clock, of the 30 s suspension
            assert 3 not in holders(c.nodes[1].stage_server.plan)
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        assert not any(node.plans.evicted for node in c.nodes)


async def test_a_suspension_ended_by_an_unchanged_plan_is_ended_in_the_agreed_log(
    tiny_model: Path, tmp_path: Path
) -> None:
    """n = 5 (chain 0, 1; standbys 2, 3; node 4 idle). Node 3, behind a TCP cut whose
    heartbeats still arrive, is suspended and node 4 takes its copy. Healed and taken
    back after its 30 s, node 3 is given nothing (every range has its holders: the
    re-plan changes nothing and is not agreed), so an agreed `resume_node` ends its
    suspension on every node; a gateway taking over later does not suspend it again.
    Before, the agreed log kept it suspended, and node 1, taking over, put the honest
    node out for another whole period with its strike kept (a review)."""
    settings = {
        **SETTINGS,
        "cluster.gateways": [0, 1],
        "network.step_timeout_ms": 500,
        "byzantine.max_step_timeouts": 1,
    }
    async with InProcessCluster(tiny_model, 5, tmp_path, f=1, settings=settings) as c:
        gw = c.gateway
        serving = gw.gateway
        assert serving is not None
        first = await c.first_plan()
        await c.until(lambda: serving.scheduler is not None, "node 0 serving")
        assert 3 in holders(first) and 4 not in holders(first), first
        c.net.blackholed.add(NodeId(3))  # frames only: its heartbeats still arrive
        for k in range(4):  # audits reach the standby 3 and time out
            if gw.recovery.suspended(NodeId(3)):
                break
            await c.infer(task(tiny_model, f"r{k}"))
        await c.until(lambda: gw.recovery.suspended(NodeId(3)), "node 3 suspended")
        await c.until(lambda: 3 not in holders(gw.stage_server.plan), "node 3 out")
        await c.until(lambda: NodeId(3) in c.nodes[1].plans.suspended, "suspension agreed")
        out = gw.stage_server.plan
        c.net.blackholed.discard(NodeId(3))  # healed
        await c.until(lambda: not gw.recovery.suspended(NodeId(3)), "taken back", beats=1000)
        await c.until(
            lambda: all(NodeId(3) not in n.plans.suspended for n in c.nodes),
            "its suspension ended in the agreed log",
        )
        assert gw.stage_server.plan == out  # no plan named it: the re-plan changed nothing
        standby = c.nodes[1].gateway
        assert standby is not None
        c.kill(0)
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over", beats=1000)
        shown = {h.node: h for h in c.nodes[1].engine.health().nodes}[NodeId(3)]
        assert not c.nodes[1].recovery.suspended(NodeId(3)) and shown.suspended_s is None
        assert NodeId(3) not in c.nodes[1].recovery.out
        assert not any(node.plans.evicted for node in c.nodes)


async def test_a_suspension_being_agreed_ends_with_the_gateways_loops(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A suspension is ordered in the background; when the node stops acting or stops,
    the proposal ends with it (it ran on, and logged its failure after the node was
    gone: a review)."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        serving = gw.gateway
        assert serving is not None
        await c.until(lambda: serving.scheduler is not None, "node 0 serving")
        for n in (1, 2, 3):  # no quorum: the proposal waits for its agreement timeout
            c.net.blackholed.add(NodeId(n))
        await gw.recovery.suspend((NodeId(3),), "left its steps unanswered")
        ordering = set(gw.recovery._ordering)
        assert ordering
    await asyncio.sleep(0)
    assert all(t.done() for t in ordering)
