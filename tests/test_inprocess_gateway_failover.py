"""The gateway role moves: the acting gateway dies mid-generation and its successor takes
over, by agreement, with every task (butterfly.testing.inprocess).

n = 4, f = 1, gateways (0, 1). Node 0 accepts tasks (each copied to node 1 before the
submit returns) and checkpoints their generations to node 1 every 4 tokens; node 0 is
cut off mid-generation; node 1's detector sees it fail, node 1 proposes its takeover,
the others agree because their detectors see the same, and node 1 re-plans and serves
the tasks its store holds, each resuming from its checkpoint.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import torch

from butterfly.agreement.authority import UnauthorizedCommand
from butterfly.api.app import health_body
from butterfly.dataplane.stage_server import StageServer
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage, num_layers
from butterfly.runtime.stage import prefill_outputs
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.scheduler import TaskSnapshot
from butterfly.schedule.state import TaskState, TaskStatus
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.errors import ServiceUnavailable
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceResult, InferenceTask, SamplingParams
from butterfly.types.wire.commands import TakeOver, encode_command
from butterfly.wiring.gateway import Gateway

pytestmark = pytest.mark.timeout(120)
SETTINGS = {
    "coordination.heartbeat_interval_ms": 10,
    "coordination.checkpoint_frequency": 4,
    "cluster.gateways": [0, 1],
}
PROMPT = "Once upon a time"
NEW = 24
# penalties and logprobs too: the standby must get them with the task, and the penalties
# (a function of the token history) must resume as the checkpoint left them
SAMPLED = SamplingParams(
    temperature=0.8, seed=11, presence_penalty=0.5, frequency_penalty=0.7, logprobs=2
)
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def references(tiny_model: Path) -> dict[str, list[int]]:
    """The unsplit model's tokens for PROMPT, greedy and seeded-sampled."""
    codec = TextCodec.load(tiny_model)
    stage, ids = load_stage(tiny_model), codec.encode(PROMPT)
    return {
        "greedy": list(generate([stage], ids, NEW, stop_ids=codec.eos_ids)),
        "sampled": list(generate([stage], ids, NEW, sampling=SAMPLED, stop_ids=codec.eos_ids)),
        "short": list(generate([stage], ids, 3, stop_ids=codec.eos_ids)),
    }


def task(model: Path, name: str, sampling: SamplingParams = GREEDY) -> InferenceTask:
    ids = tuple(TextCodec.load(model).encode(PROMPT))
    new = 3 if name == "short" else NEW
    return InferenceTask(RequestId(name), input_ids=ids, max_new_tokens=new, sampling=sampling)


def gateway(c: InProcessCluster, node: int) -> Gateway:
    gw = c.nodes[node].gateway
    assert gw is not None
    return gw


async def cut_off_after_a_checkpoint(c: InProcessCluster, task_id: str) -> int:
    """Node 0 killed once `task_id` made 5 tokens and node 1 holds a checkpoint of it;
    how many it had made."""
    first, standby = gateway(c, 0), gateway(c, 1)
    assert first.scheduler is not None
    produced = 0
    async for _ in first.scheduler.stream(task_id):
        produced += 1
        if produced >= 5 and standby.replicas.store.checkpoint(task_id) is not None:
            c.kill(0)
            return produced
    raise AssertionError("the task finished before node 1 had a checkpoint")


@pytest.mark.parametrize(("n", "f"), [(4, 1), (3, 0)])
async def test_the_successor_takes_over_and_every_task_completes_with_its_tokens(
    tiny_model: Path, tmp_path: Path, references: dict[str, list[int]], n: int, f: int
) -> None:
    """With f = 1 the dead gateway's stage has a standby (promoted); with f = 0 the
    survivors take its layers over."""
    async with InProcessCluster(tiny_model, n, tmp_path, f=f, settings=SETTINGS) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        assert c.nodes[2].gateway is None  # not gateway-capable
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert first.scheduler is not None
        # a task that finishes on node 0: its result must stay readable from node 1
        await first.scheduler.submit(task(tiny_model, "short"))
        short = await first.scheduler.wait("short", 30)
        assert short.state.status is TaskStatus.COMPLETED

        def settled_on_standby() -> bool:
            stored = standby.replicas.store.get("short")
            return stored is not None and stored.result is not None

        await c.until(settled_on_standby, "the short task's result copied to node 1")
        running = [task(tiny_model, "greedy"), task(tiny_model, "sampled", SAMPLED)]
        for t in running:
            await first.scheduler.submit(t)
            # the copy is on node 1 before submit returns (the 202)
            assert standby.replicas.store.get(t.task_id) is not None

        killed_at = await asyncio.wait_for(cut_off_after_a_checkpoint(c, "greedy"), 30)
        assert killed_at < NEW
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over")
        assert all(node.role.acting == 1 and node.role.term == 1 for node in c.nodes[1:])
        scheduler = standby.scheduler
        assert scheduler is not None

        def finished(task_id: str) -> bool:
            stored = standby.replicas.store.get(task_id)
            return stored is not None and stored.state.terminal

        await c.until(lambda: all(finished(t.task_id) for t in running), "tasks", beats=1000)
        # the store is written before the scheduler shows the task finished
        greedy = await scheduler.wait("greedy", 10)
        sampled = await scheduler.wait("sampled", 10)
        assert greedy.result is not None and sampled.result is not None
        assert list(greedy.result.output_ids) == references["greedy"]
        assert list(sampled.result.output_ids) == references["sampled"]
        assert greedy.result.timings["resumed_from_checkpoint"] >= 4  # not from scratch
        old = await scheduler.snapshot("short")  # finished before the takeover
        assert old.result is not None and list(old.result.output_ids) == references["short"]
        plan = c.nodes[1].stage_server.plan
        assert plan is not None and 0 not in (*plan.nodes, *(n for n, _ in plan.replicas))
        # /health's `plan` names the stages in force after the takeover's re-plan
        shown = c.nodes[1].engine.health().plan
        assert shown is not None and shown["epoch"] == plan.epoch
        assert [s["node"] for s in shown["stages"]] == list(plan.nodes)  # type: ignore[index,union-attr]


async def test_the_gateway_that_took_over_dies_too_and_the_first_one_takes_it_back(
    tiny_model: Path, tmp_path: Path, references: dict[str, list[int]]
) -> None:
    """Node 0 dies, node 1 takes over; node 0 comes back as a standby; then node 1 dies
    mid-generation. Node 1 was also the agreement's primary (view 1), so node 0's
    takeover needs a view change, whose view changes quote the plans node 0 ordered
    before it was replaced. Those were judged by the acting gateway of today (node 1):
    every view change was invalid, none was ever installed, and the cluster served
    nothing for good (seen on `cluster up`: kill -9 node 0, then node 1)."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        await c.until(lambda: gateway(c, 0).scheduler is not None, "node 0 serving")
        c.kill(0)
        await c.until(lambda: gateway(c, 1).scheduler is not None, "node 1 takes over")
        assert c.nodes[1].agreement.driver.primary == 1  # acting gateway and primary
        await c.restart(0)
        await c.until(lambda: c.nodes[0].role.acting == 1, "node 0 back as a standby")
        # and taken back by node 1, which copies tasks only to standbys it does not hold
        # failed (a task accepted before goes to node 0 with its resync); without this the
        # task could finish before node 0 had any copy (1 run in 4)
        await c.until(
            lambda: c.nodes[1].membership.status(NodeId(0)) == "healthy", "node 0 readmitted"
        )
        second = gateway(c, 1)
        assert second.scheduler is not None
        await second.scheduler.submit(task(tiny_model, "greedy"))

        async def cut_off_after_a_checkpoint() -> None:
            assert second.scheduler is not None
            produced = 0
            async for _ in second.scheduler.stream("greedy"):
                produced += 1
                if produced >= 5 and gateway(c, 0).replicas.store.checkpoint("greedy"):
                    c.kill(1)
                    return
            raise AssertionError("the task finished before node 0 had a checkpoint")

        await asyncio.wait_for(cut_off_after_a_checkpoint(), 30)
        first = gateway(c, 0)
        await c.until(lambda: first.scheduler is not None, "node 0 takes over again", beats=600)
        assert all(c.nodes[i].role.acting == 0 for i in (0, 2, 3))
        assert all(c.nodes[i].role.term == 2 for i in (0, 2, 3))
        assert first.scheduler is not None
        done = await first.scheduler.wait("greedy", 60)
        assert done.result is not None
        assert list(done.result.output_ids) == references["greedy"]


async def test_a_takeover_is_refused_unless_the_replicas_see_the_gateway_failed(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 1 alone stops hearing node 0 (a cut link, not a death): it proposes its
    takeover, but the other replicas still hear node 0 and never prepare it; a member
    that is not gateway-capable cannot even propose one."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        first = gateway(c, 0)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        with pytest.raises(UnauthorizedCommand, match="not gateway-capable"):
            await c.nodes[2].agreement.propose(encode_command(TakeOver(NodeId(2), 1)), 5.0)
        with pytest.raises(UnauthorizedCommand, match="not failed"):  # node 1 hears node 0
            await c.nodes[1].agreement.propose(encode_command(TakeOver(NodeId(1), 1)), 5.0)
        c.hub.cut.add((NodeId(0), NodeId(1)))
        await c.until(lambda: c.nodes[1].membership.status(NodeId(0)) == "failed", "suspicion")
        proposal = asyncio.create_task(
            c.nodes[1].agreement.propose(encode_command(TakeOver(NodeId(1), 1)), 3.0)
        )
        await c.until(proposal.done, "the proposal to end", beats=2000)
        assert proposal.exception() is not None  # never committed
        assert all(node.role.acting == 0 and node.role.term == 0 for node in c.nodes)
        assert first.scheduler is not None  # node 0 still serves


async def test_a_standby_that_was_away_is_given_what_it_missed(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 1 is cut off while node 0 accepts a task (no copy reaches it); once node 1 is
    heard again, node 0 gives it the task and its end, so node 0's death would not lose it."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert first.scheduler is not None
        c.kill(1)
        await c.until(lambda: c.nodes[0].membership.status(NodeId(1)) == "failed", "failure")
        await first.scheduler.submit(task(tiny_model, "greedy"))
        assert standby.replicas.store.get("greedy") is None  # it was away
        done = await first.scheduler.wait("greedy", 60)
        assert done.state.status is TaskStatus.COMPLETED and done.result is not None
        c.revive(1)

        def caught_up() -> bool:
            stored = standby.replicas.store.get("greedy")
            return stored is not None and stored.result is not None

        await c.until(caught_up, "node 1 given the task it missed", beats=1000)
        stored = standby.replicas.store.get("greedy")
        assert stored is not None and stored.result is not None
        assert stored.result.output_ids == done.result.output_ids
        assert c.nodes[1].role.acting == 0  # it came back as a standby


async def test_a_standby_deletes_finished_tasks_after_the_result_ttl(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`scheduling.result_ttl_s` holds for a standby's copies too: node 1 deletes a
    finished task and its result as node 0 does (it kept them for good)."""
    settings = {**SETTINGS, "scheduling.result_ttl_s": 1}
    async with InProcessCluster(tiny_model, 3, tmp_path, f=0, settings=settings) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert first.scheduler is not None
        await first.scheduler.submit(task(tiny_model, "short"))
        assert (await first.scheduler.wait("short", 60)).state.status is TaskStatus.COMPLETED

        def settled_on_standby() -> bool:
            stored = standby.replicas.store.get("short")
            return stored is not None and stored.result is not None

        await c.until(settled_on_standby, "the result copied to node 1")

        def gone() -> bool:
            return all(g.replicas.store.get("short") is None for g in (first, standby))

        await c.until(gone, "nodes 0 and 1 deleting it a second after it ended", beats=1000)


async def test_a_gateway_starting_to_act_runs_the_tasks_only_a_standby_held(
    tiny_model: Path, tmp_path: Path, references: dict[str, list[int]]
) -> None:
    """Node 1 holds an unfinished task node 0 never saw (node 1 accepted it while acting
    and node 0 was down, then the whole cluster restarted): node 0, acting again, takes
    it from node 1 before it serves, runs it, and node 1 is told its end."""
    c = InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS)
    held = task(tiny_model, "greedy")
    gateway(c, 1).replicas.store.copy(held)
    async with c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert first.scheduler is not None
        done = await first.scheduler.wait(held.task_id, 60)
        assert done.result is not None
        assert list(done.result.output_ids) == references["greedy"]

        def settled_on_standby() -> bool:
            stored = standby.replicas.store.get(held.task_id)
            return stored is not None and stored.state.terminal

        await c.until(settled_on_standby, "node 1 told the task's end")


async def test_a_gateway_starting_to_act_takes_the_results_only_a_standby_held(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 1 acted while node 0 was down and finished two tasks before the whole cluster
    stopped: one node 0 never saw, one node 0 holds a copy of, unfinished. Node 0, acting
    again, takes both results from node 1: the first is readable from it, the second is
    not run again (its result is node 1's, not a fresh run's tokens)."""
    c = InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS)
    unseen, copied = task(tiny_model, "unseen"), task(tiny_model, "copied")
    marked = {unseen.task_id: (7, 7, 7), copied.task_id: (9, 9, 9)}  # no run gives these
    standby_store = gateway(c, 1).replicas.store
    for t in (unseen, copied):
        standby_store.copy(t)
        result = InferenceResult(t.task_id, output_ids=marked[t.task_id])
        standby_store.finish(t.task_id, TaskState(TaskStatus.COMPLETED), result)
    gateway(c, 0).replicas.store.copy(copied)
    async with c:
        first = gateway(c, 0)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert first.scheduler is not None
        for t in (unseen, copied):
            done = await first.scheduler.wait(t.task_id, 60)
            assert done.state.status is TaskStatus.COMPLETED
            assert done.result is not None
            assert done.result.output_ids == marked[t.task_id]


@pytest.mark.parametrize("n", [3, 4])
async def test_a_frozen_gateway_that_thaws_after_its_replacement_does_not_split_the_cluster(
    tiny_model: Path, tmp_path: Path, references: dict[str, list[int]], n: int
) -> None:
    """f = 0. Node 0 freezes (a SIGSTOP, a VM pause, a stall under load): the others see
    it fail and node 1 takes over. Node 0, alone, sees every peer fail. When it thaws,
    there must still be one agreed log: node 0 learns it no longer acts and stops
    serving, and every node follows node 1. Node 0's re-plan around the peers it could
    not hear must never take effect, and with a majority deciding (protocol.quorum) the
    takeover must still go through at n = 3 and 4."""
    async with InProcessCluster(tiny_model, n, tmp_path, f=0, settings=SETTINGS) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        c.kill(0)  # heard by no one, and hearing no one
        deaf = {(NodeId(i), NodeId(0)) for i in range(1, n)}
        c.hub.cut |= deaf
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over")
        await c.until(lambda: c.nodes[0].membership.status(NodeId(1)) == "failed", "node 0 alone")
        for _ in range(20):  # node 0 keeps running on its own for a while
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        c.revive(0)
        c.hub.cut -= deaf
        await c.until(
            lambda: all(node.role.acting == 1 and node.role.term == 1 for node in c.nodes),
            "every node follows node 1",
            beats=1000,
        )
        await c.until(lambda: first.scheduler is None, "node 0 stops serving")
        scheduler = standby.scheduler
        assert scheduler is not None
        await scheduler.submit(task(tiny_model, "greedy"))
        done = await asyncio.wait_for(_settled(c, standby, "greedy"), 60)
        assert done.result is not None and list(done.result.output_ids) == references["greedy"]

        def one_log() -> bool:  # one agreed log, not two: the same length everywhere
            return len({node.agreement.driver.last_executed for node in c.nodes}) == 1

        def one_plan() -> bool:  # applied after its command executes, so waited for too
            plan = c.nodes[1].stage_server.plan
            return plan is not None and all(node.stage_server.plan == plan for node in c.nodes[1:])

        await c.until(one_log, "every node executed the same log", beats=1000)
        await c.until(one_plan, "nodes 1-3 hold the agreed plan", beats=1000)
        agreed = c.nodes[1].stage_server.plan
        assert agreed is not None
        # node 0's re-plan around the peers it could not hear was never agreed or applied
        alone = c.nodes[0].stage_server.plan
        assert alone is not None and (alone == agreed or alone.epoch < agreed.epoch)


async def test_a_cancelled_task_stays_cancelled_after_the_gateway_dies(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 0 is cut off right after it answered a cancel. The cancel's end went to node
    1 one-way, after the answer: node 1's copy still said queued, and the gateway taking
    over ran a task its client was told is cancelled (a review). The answer now waits
    for a standby to hold the end."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert first.scheduler is not None
        t = task(tiny_model, "cancelled")
        await first.scheduler.submit(t)  # the 202: node 1 holds a copy
        snap = await first.scheduler.cancel(t.task_id)  # the DELETE's answer
        assert snap.state.status is TaskStatus.CANCELLED
        c.kill(0)  # before anything one-way could reach node 1
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over", beats=3000)
        done = await asyncio.wait_for(_settled(c, standby, t.task_id), 60)
        assert done.state.status is TaskStatus.CANCELLED, done.state


@pytest.mark.parametrize("died", ["after-its-result", "mid-generation"])
async def test_an_unseeded_sampled_task_gives_the_same_tokens_after_a_failover(
    tiny_model: Path, tmp_path: Path, died: str
) -> None:
    """A sampled task that names no seed, as most clients send it, and no checkpoint yet
    (the frequency is past its tokens): node 1 runs it from the start. Node 0 dies after
    the client read its result (the end, one-way, had not reached node 1) or after 4
    streamed tokens. Its RNG was seeded afresh at each run, so the same task id then
    answered other tokens (a review); the seed drawn at acceptance is stored with it."""
    settings = {**SETTINGS, "coordination.checkpoint_frequency": 100}
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert first.scheduler is not None
        t = task(tiny_model, died, SamplingParams(temperature=1.0))
        await first.scheduler.submit(t)
        seen: list[int] = []
        if died == "after-its-result":
            read = await first.scheduler.wait(t.task_id, 60)  # GET /result?wait=
            assert read.result is not None
            seen = list(read.result.output_ids)
            c.kill(0)
            held = standby.replicas.store.get(t.task_id)
            assert held is not None and not held.state.terminal  # node 1 runs it again
        else:
            async for token in first.scheduler.stream(t.task_id):
                assert isinstance(token, int)
                seen.append(token)
                if len(seen) == 4:
                    c.kill(0)
                    break
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over", beats=3000)
        done = await asyncio.wait_for(_settled(c, standby, t.task_id), 60)
        assert done.result is not None and done.result.output_ids[: len(seen)] == tuple(seen)


async def test_a_gateway_that_lost_a_quorum_refuses_tasks_and_its_successor_runs_them(
    tiny_model: Path, tmp_path: Path, references: dict[str, list[int]]
) -> None:
    """n = 4, f = 1. Node 0, acting, is cut off from every peer: the three it no longer
    hears are a quorum that can agree a takeover without it, so it refuses a task at
    once, writing nothing, instead of holding it on a cluster that moves on. Node 1 takes
    over and runs the task the client sends it instead."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        scheduler = first.scheduler
        assert scheduler is not None
        c.kill(0)
        c.hub.cut |= {(NodeId(i), NodeId(0)) for i in range(1, 4)}
        peers = [NodeId(i) for i in range(1, 4)]
        membership = c.nodes[0].membership
        await c.until(lambda: all(membership.status(p) == "failed" for p in peers), "alone")
        await c.until(lambda: scheduler.refusing() is not None, "refusing")  # pings failed
        with pytest.raises(ServiceUnavailable, match=r"node 0 has lost 3 of the 4 members"):
            await scheduler.submit(task(tiny_model, "greedy"))
        assert first.replicas.store.get("greedy") is None  # nothing was written
        assert refusing(c, 0) == 1.0  # an operator sees why
        health = health_body(c.nodes[0].engine.health(), scheduler)  # what GET /health says
        assert not health["healthy"] and health["services"]["scheduling"] == "down"
        assert "node 0 has lost 3 of the 4 members" in health["refusing_tasks"]
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over", beats=3000)
        assert standby.scheduler is not None
        await standby.scheduler.submit(task(tiny_model, "greedy"))
        done = await asyncio.wait_for(_settled(c, standby, "greedy"), 60)
        assert done.result is not None and list(done.result.output_ids) == references["greedy"]


async def test_a_gateway_that_hears_no_one_steps_down_and_is_replaced(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 0, acting, is cut off on the way in only: it hears no heartbeat and no
    connection to or from it completes, while its own heartbeats still reach the others.
    It refuses tasks, and stops beating: its peers see it fail and node 1 takes over.
    Before, the peers heard node 0 and vetoed any takeover, and the cluster served
    nothing for as long as the cut lasted (a review, with real processes). Healed,
    node 0 beats again and stands by; nobody is evicted."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        scheduler = first.scheduler
        assert scheduler is not None
        inward = {(NodeId(i), NodeId(0)) for i in range(1, 4)}
        c.hub.cut |= inward
        c.net.down.add(NodeId(0))
        await c.until(lambda: scheduler.refusing() is not None, "node 0 refusing", beats=1000)
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over", beats=3000)
        await standby.scheduler.submit(task(tiny_model, "greedy"))
        done = await asyncio.wait_for(_settled(c, standby, "greedy"), 60)
        assert done.state.status is TaskStatus.COMPLETED
        c.hub.cut -= inward
        c.net.down.discard(NodeId(0))
        heard = c.nodes[1].membership
        await c.until(lambda: heard.status(NodeId(0)) == "healthy", "node 0 heard again")
        await c.until(lambda: c.nodes[0].role.acting == 1, "node 0 stands by", beats=1000)
        assert not c.nodes[1].plans.evicted


async def test_a_gateway_deaf_to_heartbeats_but_reachable_keeps_serving(
    tiny_model: Path, tmp_path: Path, references: dict[str, list[int]]
) -> None:
    """Node 0 hears no heartbeat (datagrams dropped on the way in, as a firewall may),
    yet its own reach the others and its connections work. Its detector loses every
    peer, but the peers answer its pings and veto any takeover: it must keep taking
    tasks, or the cluster would stop serving altogether."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        first = gateway(c, 0)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        scheduler = first.scheduler
        assert scheduler is not None
        c.hub.cut |= {(NodeId(i), NodeId(0)) for i in range(1, 4)}
        peers = [NodeId(i) for i in range(1, 4)]
        membership = c.nodes[0].membership
        await c.until(lambda: all(membership.status(p) == "failed" for p in peers), "deaf")
        for _ in range(30):  # 1.5 s: past a ping round that would time out (1 s)
            c.hub.tick(0.1)
            await asyncio.sleep(0.05)
        assert scheduler.refusing() is None  # the isolation watch pinged them and found them
        assert refusing(c, 0) == 0.0
        await scheduler.submit(task(tiny_model, "greedy"))
        done = await asyncio.wait_for(_settled(c, first, "greedy"), 60)
        assert done.result is not None and list(done.result.output_ids) == references["greedy"]
        assert all(node.role.acting == 0 for node in c.nodes)


async def test_a_first_gateway_that_never_comes_up_is_replaced(
    tiny_model: Path, tmp_path: Path, references: dict[str, list[int]]
) -> None:
    """Node 0, the first gateway, never starts. Never heard, it reads as "starting", not
    failed, and before, nobody took over: the cluster never served. A node started a
    little late must not lose the role either, so the others wait
    `coordination.never_heard_s` of silence (20 s here, not the default 30: the setting
    is what decides); then node 1 takes over, plans over the three and serves, and its
    /health shows node 0 failed, as the role counts it, no longer "starting"."""
    grace_s = 20.0
    beats = round(grace_s * 10)  # 100 ms of fake time each
    settings = {**SETTINGS, "coordination.never_heard_s": grace_s}
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings, absent=(0,)) as c:
        standby = gateway(c, 1)
        for _ in range(beats - 50):  # 5 s short of it: node 0 may still be starting
            c.hub.tick(0.1)
            await asyncio.sleep(0.001)
        assert all(node.role.acting == 0 for node in c.nodes[1:])
        assert _shown(c, 1, 0) == _scraped(c, 1, 0) == "starting"
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over", beats=3000)
        assert _shown(c, 1, 0) == _scraped(c, 1, 0) == "failed"
        assert _scraped(c, 2, 0) == "failed"  # every member's metric, not the gateway's only
        assert all(node.role.acting == 1 and node.role.term == 1 for node in c.nodes[1:])
        assert standby.scheduler is not None
        await standby.scheduler.submit(task(tiny_model, "greedy"))
        done = await asyncio.wait_for(_settled(c, standby, "greedy"), 60)
        assert done.result is not None and list(done.result.output_ids) == references["greedy"]


def _scraped(c: InProcessCluster, node: int, of: int) -> str:
    """The state node `node`'s GET /metrics gives node `of` (`butterfly_node_status`)."""
    text = c.nodes[node].metrics.render().decode()
    found = re.findall(rf'node_status{{\w*node_status="(\w+)",node="{of}"}} 1\.0', text)
    assert len(found) == 1, text
    return str(found[0])


def _shown(c: InProcessCluster, node: int, of: int) -> str:
    """What node `node`'s GET /health says of node `of` (`health_body` shows each
    member's status as the engine's health gives it)."""
    return next(h.status for h in c.nodes[node].engine.health().nodes if h.node == of)


def refusing(c: InProcessCluster, node: int) -> float:
    """`butterfly_gateway_refusing_tasks` as the node's /metrics would show it."""
    for line in c.nodes[node].metrics.render().decode().splitlines():
        if line.startswith("butterfly_gateway_refusing_tasks "):
            return float(line.split()[1])
    raise AssertionError("no butterfly_gateway_refusing_tasks in the node's metrics")


async def _settled(c: InProcessCluster, gw: Gateway, task_id: str) -> TaskSnapshot:
    def finished() -> bool:
        stored = gw.replicas.store.get(task_id)
        return stored is not None and stored.state.terminal

    await c.until(finished, task_id, beats=1500)
    assert gw.scheduler is not None
    return await gw.scheduler.wait(task_id, 10)  # stored terminal; settled here too


async def test_with_f_0_a_standby_that_alone_stops_hearing_the_gateway_does_not_take_over(
    tiny_model: Path, tmp_path: Path
) -> None:
    """f = 0, n = 4: node 1 alone stops hearing node 0 (heartbeats lost on one link, as
    when node 1's beats reader stalls under load). The others still hear node 0, so no
    takeover may be agreed: with one vote deciding, node 1 had moved to a view of its own,
    ordered its own takeover and served as a second gateway, refusing node 0's plans while
    the rest followed them (a 4-node cluster under cProfile, 2026-12-05)."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=0, settings=SETTINGS) as c:
        first = gateway(c, 0)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        c.hub.cut.add((NodeId(0), NodeId(1)))
        await c.until(lambda: c.nodes[1].membership.status(NodeId(0)) == "failed", "suspicion")
        for _ in range(100):
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        assert all(node.role.acting == 0 and node.role.term == 0 for node in c.nodes)
        assert gateway(c, 1).scheduler is None and first.scheduler is not None


async def test_a_resumed_sampled_request_with_logprobs_is_verified(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Resumed from node 0's checkpoint, the sampled request reports a logprob for every
    token, those node 0 made too (node 1 scores them from the rows of the prefill that
    resumes the request; before, the answer held only those made after the resume), each
    the model's own; its audit holds them to the re-executed rows and verifies it (paired
    with the wrong tokens, it came back unverified: a review)."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert first.scheduler is not None
        await first.scheduler.submit(task(tiny_model, "sampled", SAMPLED))

        await asyncio.wait_for(cut_off_after_a_checkpoint(c, "sampled"), 30)
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over")
        scheduler = standby.scheduler
        assert scheduler is not None
        snap = await _settled(c, standby, "sampled")
        result = snap.result
        assert result is not None and result.timings["resumed_from_checkpoint"] >= 4
        assert [s.token for s in result.logprobs] == list(result.output_ids)
        ids = [*task(tiny_model, "sampled", SAMPLED).input_ids, *result.output_ids]
        stage = load_stage(tiny_model, LayerRange(0, num_layers(tiny_model)))
        with torch.inference_mode():
            out = prefill_outputs(stage, torch.tensor([ids]), stage.new_cache())
            rows = torch.log_softmax(out[0].float(), dim=-1)
        first = len(ids) - len(result.output_ids) - 1  # the row that scores the first token
        for i, s in enumerate(result.logprobs):
            assert abs(s.logprob - float(rows[first + i, s.token])) < 1e-3, i
            assert len(s.top) == SAMPLED.logprobs
        assert result.verified == "audit"
        assert {int(n) for n in c.nodes[1].plans.evicted} <= {0}


KILL_AT_AUDIT: dict[str, object] = {"fire": None}


class SeesTheGatewayDieAtItsAudit(StageServer):
    """Honest; the first audit it is asked for (once armed) waits for `fire`."""

    async def audit(self, msg, payload):  # type: ignore[no-untyped-def]
        fire, KILL_AT_AUDIT["fire"] = KILL_AT_AUDIT["fire"], None
        if fire is not None:
            await fire()  # type: ignore[operator]
        return await super().audit(msg, payload)


ECHO = SamplingParams(prompt_logprobs=1)  # greedy, and the prompt's logprobs asked for


@pytest.mark.parametrize("name, sampling", [("greedy", GREEDY), ("echo", ECHO)])
async def test_a_request_resumed_with_every_token_is_still_audited(
    tiny_model: Path,
    tmp_path: Path,
    references: dict[str, list[int]],
    name: str,
    sampling: SamplingParams,
) -> None:
    """Node 0 dies during the audit, its last checkpoint (on node 1) holding every token
    (24, checkpointed every 4): node 1 resumes with nothing to generate, sends the
    history once as a prefill and audits it. It computed no step, skipped the audit, and
    the tokens came back `verified: "none"` in a cluster that audits every request (a
    review). With the prompt's logprobs asked for (the checkpoint holds none), the step
    that scores the prompt also sampled a 25th token, one more than max_tokens, that the
    dead gateway never made (a review)."""
    servers = {2: SeesTheGatewayDieAtItsAudit, 3: SeesTheGatewayDieAtItsAudit}
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=SETTINGS, stage_servers=servers
    ) as c:
        first, standby = gateway(c, 0), gateway(c, 1)
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert first.scheduler is not None
        every = len(references["greedy"])
        assert every == NEW  # no end of sequence before: the last checkpoint holds all
        audited = asyncio.Event()

        async def kill_the_gateway() -> None:
            audited.set()
            for _ in range(400):  # bounded: the last checkpoint reaches node 1
                saved = standby.replicas.store.checkpoint(name)
                if saved is not None and len(saved.tokens) == every:
                    break
                await asyncio.sleep(0.005)
            c.kill(0)

        KILL_AT_AUDIT["fire"] = kill_the_gateway
        try:
            await first.scheduler.submit(task(tiny_model, name, sampling))
            await c.until(audited.is_set, "the audit of the request", beats=2000)
        finally:
            KILL_AT_AUDIT["fire"] = None
        await c.until(lambda: standby.scheduler is not None, "node 1 takes over")
        result = (await _settled(c, standby, name)).result
        assert result is not None and result.timings["resumed_from_checkpoint"] == every
        assert list(result.output_ids) == references["greedy"]  # not one token more
        assert result.verified == "audit"
        prompt = task(tiny_model, name).input_ids
        assert len(result.prompt_logprobs) == (len(prompt) - 1 if sampling is ECHO else 0)
