"""A member that says a request cannot be served must not fail the client's task.

Whole nodes in one process (butterfly.testing.inprocess), n = 4 and f = 1: the chain is
0 (the gateway) -> 1, standbys 2 and 3. Node 1 answers decode steps with a non-retriable
error ("invalid input"). The claim is unsigned, so nobody may be evicted for it; the
gateway checks it on another holder of the range (dataplane.claims, or a replicate lane)
and the task completes with the unsplit model's tokens, verified. A claim the gateway
can make itself, or that every holder makes, still fails the task at once, naming it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from butterfly.dataplane.stage_server import StageServer
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import ClaimsInvalidInputStageServer, MisshapenStageServer
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.tasks import InferenceTask

pytestmark = pytest.mark.timeout(120)
PROMPTS = ("Once upon a time", "Butterfly")
NEW = 8
LIAR = 1


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> dict[str, list[int]]:
    codec = TextCodec.load(tiny_model)
    stage = load_stage(tiny_model)
    return {
        p: list(generate([stage], codec.encode(p), NEW, stop_ids=codec.eos_ids)) for p in PROMPTS
    }


def _task(ids: tuple[int, ...], n: int, new: int = NEW) -> InferenceTask:
    return InferenceTask(RequestId(f"claim-{n}"), input_ids=ids, max_new_tokens=new)


def _cluster(
    model: Path, data: Path, mode: str, liars: dict[int, type[StageServer]], n: int = 4
) -> InProcessCluster:
    settings = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": mode}
    return InProcessCluster(model, n, data, f=1, settings=settings, stage_servers=liars)


async def _run(c: InProcessCluster, task: InferenceTask) -> asyncio.Task[object]:
    run = asyncio.create_task(c.gateway.engine.run(task, lambda t: None))
    await c.until(run.done, f"{task.task_id} to finish", beats=2000)
    return run  # type: ignore[return-value]


async def _nobody_evicted(c: InProcessCluster) -> None:
    for _ in range(20):  # time for a wrongful eviction to show, were one under way
        c.hub.tick(0.1)
        await asyncio.sleep(0.005)
    assert all(not node.plans.evicted for node in c.nodes)


@pytest.mark.parametrize("mode", ["audit", "replicate"])
async def test_a_false_claim_of_invalid_input_fails_no_task(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]], mode: str
) -> None:
    codec = TextCodec.load(tiny_model)
    async with _cluster(tiny_model, tmp_path, mode, {LIAR: ClaimsInvalidInputStageServer}) as c:
        gw = c.gateway
        plan = await c.first_plan()
        assert plan is not None and LIAR in plan.nodes
        for i, prompt in enumerate(PROMPTS):
            run = await _run(c, _task(tuple(codec.encode(prompt)), i))
            result = run.result()  # no task fails
            assert list(result.output_ids) == expected[prompt]
            assert result.verified == mode
        liar = c.nodes[LIAR].stage_server
        assert isinstance(liar, ClaimsInvalidInputStageServer) and liar.claimed > 0
        if mode == "audit":  # routed around: later requests no longer go through it
            assert gw.engine.routed_around == {NodeId(LIAR)}
            assert liar.claimed == 1
        await _nobody_evicted(c)  # an unsigned claim convicts nobody


@pytest.mark.parametrize("mode", ["audit", "replicate"])
async def test_an_honest_claim_caused_by_its_sender_fails_no_task(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]], mode: str
) -> None:
    """n = 6 (chain 0 -> 1 -> 2, standbys 3, 4, 5): node 1 sends node 2 decode outputs of
    the wrong width, signed. Node 2 honestly cannot compute on them and says so; a
    standby of node 2's range fed by node 1 would say the same, so the gateway routes
    around node 2 and the node that fed it. No task fails, and node 2 is not evicted."""
    codec = TextCodec.load(tiny_model)
    async with _cluster(tiny_model, tmp_path, mode, {1: MisshapenStageServer}, n=6) as c:
        gw = c.gateway
        plan = await c.first_plan()
        assert plan is not None and plan.nodes == (0, 1, 2)
        for i, prompt in enumerate(PROMPTS):
            result = (await _run(c, _task(tuple(codec.encode(prompt)), i))).result()
            assert list(result.output_ids) == expected[prompt]
            assert result.verified == mode
        if mode == "audit":
            assert gw.engine.routed_around == {NodeId(1), NodeId(2)}
        for _ in range(20):
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        for node in c.nodes:
            assert set(node.plans.evicted) <= {NodeId(1)}  # never an honest node


async def test_a_claim_every_holder_makes_is_believed_and_named(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Both holders of the last range (nodes 1 and 3) refuse the step, as they would an
    input they genuinely cannot serve: f+1 disjoint claims, one of them honest, so the
    task fails at once with their reason; still nobody is evicted."""
    codec = TextCodec.load(tiny_model)
    both = {1: ClaimsInvalidInputStageServer, 3: ClaimsInvalidInputStageServer}
    async with _cluster(tiny_model, tmp_path, "audit", both) as c:
        gw = c.gateway
        await c.first_plan()
        run = await _run(c, _task(tuple(codec.encode(PROMPTS[0])), 0))
        error = run.exception()
        assert isinstance(error, ButterflyError) and not error.retriable
        assert error.kind == "invalid_input"
        assert "node(s) 1, 3" in str(error) and "token ids out of range" in str(error)
        assert gw.engine.routed_around == frozenset()  # they told the truth, as far as known
        await _nobody_evicted(c)


@pytest.mark.parametrize("mode", ["audit", "replicate"])
async def test_genuinely_invalid_input_fails_fast_with_a_clear_error(
    tiny_model: Path, tmp_path: Path, mode: str
) -> None:
    """What the gateway can tell itself is not put to the nodes: a prompt too long for the
    model's context is refused before a step is sent, and a token outside the vocabulary
    fails the gateway's own first stage, which it believes at once."""
    async with _cluster(tiny_model, tmp_path, mode, {}) as c:
        gw = c.gateway
        await c.first_plan()
        context = gw.engine.max_context
        long = _task((1,) * context, 0, new=2)
        with pytest.raises(ButterflyError) as caught:
            await gw.engine.run(long, lambda t: None)
        assert caught.value.kind == "context_length_exceeded"
        assert f"the model's context is {context}" in str(caught.value)
        run = await _run(c, _task((10**6,), 1))
        error = run.exception()
        assert isinstance(error, ButterflyError) and not error.retriable
        assert "node(s) 0" in str(error) or "node 0" in str(error), error
        await _nobody_evicted(c)
