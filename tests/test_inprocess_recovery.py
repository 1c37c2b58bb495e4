"""Recovery and eviction of whole nodes in one process (butterfly.testing.inprocess).

Four nodes built by `node.build_node`, as node processes are, over the in-memory
transport and a heartbeat hub with a fake clock: the path from a missed heartbeat to
the resumed request (or from a proven lie to the agreed eviction) runs as in a cluster,
without processes, sockets or waiting on real time. tests/test_recovery.py and
tests/test_byzantine.py keep the same faults covered with real processes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from butterfly.dataplane.stage_server import StageServer
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import (
    CorruptStageServer,
    UncopiedStageServer,
    WeakUncopiedStageServer,
)
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask, SamplingParams
from butterfly.types.wire.control import PlanAck, PlanAssign
from butterfly.types.wire.data import StageStep

pytestmark = pytest.mark.timeout(60)
SETTINGS = {"coordination.heartbeat_interval_ms": 10}
PROMPT = "Once upon a time"
NEW = 24


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> list[int]:
    """The unsplit model's tokens for PROMPT (computed once: torch's first use in a
    process costs most of a second, which is not what these tests time)."""
    codec = TextCodec.load(tiny_model)
    stage = load_stage(tiny_model)
    return list(generate([stage], codec.encode(PROMPT), NEW, stop_ids=codec.eos_ids))


def task(model: Path, n: int) -> InferenceTask:
    ids = tuple(TextCodec.load(model).encode(PROMPT))
    return InferenceTask(RequestId(f"request-{n}"), input_ids=ids, max_new_tokens=NEW)


def agreed_everywhere(c: InProcessCluster, plan: StagePlan, nodes: set[int]) -> bool:
    """Every listed node executed the same agreed plan and has it in force."""
    return all(
        c.nodes[n].plans.latest == plan and c.nodes[n].stage_server.plan == plan for n in nodes
    )


async def test_a_killed_chain_node_hands_its_stage_to_the_standby(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """n = 4, f = 1: chain 0 -> 1, standbys 2 and 3. Node 1 (also the agreement's first
    primary) dies at the fifth token of a request; the gateway notices from heartbeats,
    promotes node 3 (the standby of node 1's range), gets the plan agreed, and the request
    finishes with the tokens the unsplit model gives."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        first = await c.first_plan()
        assert first is not None and first.nodes == (0, 1)
        assert {n for n, _ in first.replicas} == {2, 3}
        result = await c.infer_killing(task(tiny_model, 1), 1, at=5)
        assert list(result.output_ids) == expected
        assert result.timings["recoveries"] >= 1
        plan = gw.stage_server.plan
        assert plan is not None and plan.epoch == first.epoch + 1
        assert plan.nodes == (0, 3)  # promoted: node 3 held node 1's range already
        assert [r for _, r in plan.stages] == [r for _, r in first.stages]
        assert agreed_everywhere(c, plan, {0, 2, 3})
        assert gw.recovery.failed == {NodeId(1)}
        assert gw.agreement.driver.view > 1  # the plan was agreed under a new primary
        assert 1 not in {s.node for s in result.stages}
        # serving again, without node 1: healthy, and the members say what is missing
        health = gw.engine.health()
        assert health.healthy and not health.services["members"] and health.services["network"]
        # node 1 held the request's cache when it died: failed, it holds none for anyone
        (gone,) = [h for h in health.nodes if h.node == 1]
        assert gone.status == "failed" and gone.requests == 0


async def test_a_request_that_went_on_under_a_new_plan_is_audited_under_both(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """n = 5, f = 1: chain 0 -> 1, standbys 2 and 3, node 4 spare. Node 1 dies at the
    fifth token; the request goes on under the next plan (chain 0 -> 3, node 4 the new
    second holder of the range) from where node 3's caches stood. Its earlier steps are
    audited under the first plan (by node 3), the later ones under the second (by node
    4): verified, where it came back `none` when only the last plan's records were read."""
    async with InProcessCluster(tiny_model, 5, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        first = await c.first_plan()
        assert first is not None and first.nodes == (0, 1)
        result = await c.infer_killing(task(tiny_model, 1), 1, at=5)
        assert list(result.output_ids) == expected
        assert result.timings["recoveries"] >= 1 and result.timings["resumed_at"] > 0
        plan = gw.stage_server.plan
        assert plan is not None and plan.epoch > first.epoch and 1 not in plan.nodes
        assert result.verified == "audit"
        assert not any(node.plans.evicted for node in c.nodes)


@pytest.mark.parametrize("at", [4, 5])
async def test_a_liar_before_a_failure_is_caught_however_the_request_went_on(
    tiny_model: Path, tmp_path: Path, expected: list[int], at: int
) -> None:
    """n = 5, f = 1, node 1 the last stage: it skews (and signs) its logits and copies
    no KV cache to its standby, then dies at token `at`. The request replays from 0 under
    the next plan; the tokens chosen from its logits before were left unchecked (the
    replay's step signs its last row only, and the steps before were dropped from the
    audit), and the wrong answer came back verified (a review). Now the steps before
    are audited under their own plan: node 1 is caught and evicted, and the request is
    run again to the right tokens."""
    liars = {1: UncopiedStageServer}
    async with InProcessCluster(
        tiny_model, 5, tmp_path, f=1, settings=SETTINGS, stage_servers=liars
    ) as c:
        gw = c.gateway
        first = await c.first_plan()
        assert first is not None and first.nodes == (0, 1)
        result = await c.infer_killing(task(tiny_model, 1), 1, at=at)
        assert list(result.output_ids) == expected
        assert result.verified == "audit"
        assert NodeId(1) in gw.plans.evicted
        assert not set(gw.plans.evicted) - {NodeId(1)}


async def test_a_weakly_fingerprinted_liar_before_a_replay_from_0_is_not_passed_over(
    tiny_model: Path, tmp_path: Path
) -> None:
    """n = 7, f = 1, chain 0 -> 1 -> 2: node 1, the middle stage, signs one value per
    row and halves the rest, copies no KV cache, and dies at token 4; a sampled request
    replays from 0 on the next plan, so every step of the first plan is superseded. That
    plan could not be verified (weak records), and was passed over as if nobody could
    re-run it: the wrong answer came back verified (a review). Now only a plan nobody
    can re-run is passed over, and the audit of this one asks node 2 for what node 1
    sent it: node 1 is convicted on its own record, and the request computed again."""
    liars = {1: WeakUncopiedStageServer}
    sampled = SamplingParams(temperature=1.0, seed=7)
    ids = tuple(TextCodec.load(tiny_model).encode(PROMPT))
    honest = generate(
        [load_stage(tiny_model)], ids, NEW, sampled, TextCodec.load(tiny_model).eos_ids
    )
    async with InProcessCluster(
        tiny_model, 7, tmp_path, f=1, settings=SETTINGS, stage_servers=liars
    ) as c:
        first = await c.first_plan()
        assert first.nodes[1] == 1 and len(first.nodes) == 3
        task = InferenceTask(RequestId("weak"), input_ids=ids, max_new_tokens=NEW, sampling=sampled)
        result = await c.infer_killing(task, 1, at=4)
        assert result.timings["resumed_at"] == 0.0  # every first-plan step superseded
        assert list(result.output_ids) == list(honest) and result.verified == "audit"
        assert set(c.gateway.plans.evicted) == {NodeId(1)}, "the weak plan was passed over"


class LoadingGateway(StageServer):
    """Honest; its switch to a newer plan takes 1 s, as loading moved layers does."""

    async def apply_plan(self, msg: PlanAssign) -> PlanAck:
        if self.plan is not None and msg.epoch > self.plan.epoch:
            await asyncio.sleep(1.0)
        return await super().apply_plan(msg)


class SlowOnce(StageServer):
    """Honest; its step 4 of a request is still computing when the next plan arrives (a
    long chunk or a busy CPU does this): it waits, at most 4 s, for its epoch to move
    before computing, as the forward pass would have."""

    moved: bool | None = None  # None: step 4 not reached; else whether the plan moved

    async def _compute_tensors(
        self, msg: StageStep, *args: Any, **kwargs: Any
    ) -> tuple[bytes, tuple[bytes, ...]]:
        if self.moved is None and msg.steps[0] == 4:
            before, self.moved = self.epoch, False
            for _ in range(400):
                if self.epoch != before:
                    self.moved = True
                    break
                await asyncio.sleep(0.01)
        return await super()._compute_tensors(msg, *args, **kwargs)


async def test_an_honest_node_that_takes_up_a_plan_mid_step_is_not_evicted(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """n = 4, f = 1, audit, chain 0 -> 1. Node 1 is computing step 4 when standby 3 dies
    and the next plan is agreed; it takes the plan up mid-step while the gateway's own
    switch still loads. It signed the step with the new epoch, and the gateway (still
    at the old one) found no record of node 1's stage for the step's epoch and evicted
    it (a review). Now a node whose plan moved while a step computed sends nothing of
    it on: the step is lost (retriable) and replayed, nobody blamed."""
    settings = {**SETTINGS, "byzantine.verification": "audit"}
    servers = {0: LoadingGateway, 1: SlowOnce}
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=settings, stage_servers=servers
    ) as c:
        gw, slow = c.gateway, c.nodes[1].stage_server
        first = await c.first_plan()
        assert first.nodes == (0, 1)
        run = asyncio.create_task(gw.engine.run(task(tiny_model, 1), lambda t: None))
        await c.until(lambda: isinstance(slow, SlowOnce) and slow.moved is not None, "step 4")
        c.kill(3)  # a standby dies: the next plan is agreed and distributed
        await c.until(run.done, "the request", beats=3000)
        for _ in range(30):  # time for an eviction under way to be agreed
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        assert isinstance(slow, SlowOnce) and slow.moved, "the plan did not move mid-step"
        assert list(run.result().output_ids) == expected
        assert not gw.plans.evicted, f"honest node(s) evicted: {dict(gw.plans.evicted)}"


async def test_a_proven_liar_is_evicted_by_agreement_and_leaves_the_plan(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """Node 1 corrupts every activation it sends. The audit of the first request proves
    it; its eviction is agreed (every node records it), the gateway re-plans without it,
    and the request is re-run to the right tokens on the new plan."""
    liar = {1: CorruptStageServer}
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=SETTINGS, stage_servers=liar
    ) as c:
        gw = c.gateway
        first = await c.first_plan()
        assert first is not None and 1 in first.nodes
        run = asyncio.create_task(gw.engine.run(task(tiny_model, 2), lambda t: None))
        await c.until(run.done, "the request to finish")
        result = run.result()
        assert list(result.output_ids) == expected
        assert result.verified == "audit"
        assert all(NodeId(1) in node.plans.evicted for node in c.nodes)
        plan = gw.stage_server.plan
        assert plan is not None and plan.epoch > first.epoch
        holders = {*plan.nodes, *(n for n, _ in plan.replicas)}
        assert 1 not in holders
        assert agreed_everywhere(c, plan, holders)
        assert 1 not in {s.node for s in result.stages}


async def test_a_gateway_stopped_while_it_waits_for_its_peers_stops(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 0 alone: its start-up waits for nodes that never come (up to two minutes);
    a stop then ends it at once, as a SIGTERM to a cluster that never came up must."""
    c = InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS)
    stop = asyncio.Event()
    serving = asyncio.create_task(c.gateway.serve(stop))
    await asyncio.sleep(0.05)
    assert not serving.done() and c.gateway.stage_server.plan is None
    stop.set()
    await asyncio.wait_for(serving, 10)  # a hang guard: the 2-minute wait is not waited out
    for node in c.nodes[1:]:
        node.stage_server.close()
        node.config.history.close()


async def test_verification_switched_off_and_a_node_restarted_can_be_switched_back_on(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A node restarted after the cluster agreed `none` took its holders per range from
    that mode: one, no checker, and it refused `audit` from then on ("restart required"),
    which no restart could mend (the agreed history restores `none` at every start)."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        await c.first_plan()
        await gw.agreement.coordinator.update({"byzantine.verification": "none"})
        again = await c.restart(3)
        await c.until(
            lambda: again.agreement.driver.last_executed == gw.agreement.driver.last_executed,
            "node 3 caught up",
        )
        assert again.config.current.byzantine.verification == "none"
        await gw.agreement.coordinator.update({"byzantine.verification": "audit"})  # refused
        assert all(node.config.current.byzantine.verification == "audit" for node in c.nodes)
        assert again.stage_server.prover is not None  # it signs what it computes again
