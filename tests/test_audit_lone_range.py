"""A layer range that failures left with one holder is audited by the gateway's own
re-execution (`byzantine.audit_lone_ranges`), in whole nodes in one process.

n = 4, f = 1: chain 0 -> 1, standbys 2 and 3. Node 1 dies; node 3 takes its range over
and is its only holder. Before, nothing could audit it: every answer came back
unverified until node 1 returned, and a node 3 that lied then was never caught.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch

from butterfly.control.facts import room_to_load
from butterfly.dataplane.referee import Referee
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import layer_infos, load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.torch_thread import TorchThread
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import CorruptStageServer
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceTask

pytestmark = pytest.mark.timeout(120)
SETTINGS = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": "audit"}
PROMPT = "Once upon a time"
NEW = 12


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> list[int]:
    ids = TextCodec.load(tiny_model).encode(PROMPT)
    return list(generate([load_stage(tiny_model)], ids, NEW))


def task(model: Path, name: str) -> InferenceTask:
    ids = tuple(TextCodec.load(model).encode(PROMPT))
    return InferenceTask(RequestId(name), input_ids=ids, max_new_tokens=NEW)


def apply(c: InProcessCluster, patch: dict[str, object]) -> None:
    """`patch` applied on the gateway as the cluster's agreement commits it."""
    manager = c.gateway.config
    result = manager.update(patch)
    assert result.pending is not None
    manager.apply_committed(result.pending, manager.history.last_cluster_seq() + 1)


def ignore(token: object) -> None:
    pass


class CorruptOnceAlone(CorruptStageServer):
    """Honest while its range has another holder; corrupts what it sends once alone."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        plan, stage = self.plan, self.stage
        alone = plan is not None and stage is not None and len(plan.holders(stage.layers)) < 2
        return super().tamper(out) if alone else out


async def test_a_range_left_one_holder_is_audited_by_the_gateway_and_the_setting_turns_it_off(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        first = await c.first_plan()
        assert first.nodes == (0, 1)
        result = await c.infer_killing(task(tiny_model, "killed-in"), 1, at=5)
        assert list(result.output_ids) == expected and result.verified == "audit"
        alone = c.gateway.stage_server.plan
        assert alone is not None and alone.nodes == (0, 3)
        assert alone.holders(alone.stages[1][1]) == (NodeId(3),)
        result = await c.infer(task(tiny_model, "after"))
        assert list(result.output_ids) == expected and result.verified == "audit"
        apply(c, {"byzantine.audit_lone_ranges": False})
        result = await c.infer(task(tiny_model, "off"))
        assert list(result.output_ids) == expected and result.verified == "none"
        apply(c, {"byzantine.audit_lone_ranges": True})
        result = await c.infer(task(tiny_model, "on-again"))
        assert result.verified == "audit"


async def test_a_lone_holder_that_lies_is_caught_and_the_request_finishes_right(
    tiny_model: Path, tmp_path: Path, expected: list[int]
) -> None:
    """Node 3 lies once it alone holds node 1's range: the gateway's re-execution
    convicts it, and the request, run again once node 1 is back, comes back right and
    audited. Before, its lies came back as unverified answers, and it stayed."""
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=SETTINGS, stage_servers={3: CorruptOnceAlone}
    ) as c:
        gw = c.gateway
        await c.first_plan()
        c.kill(1)
        await c.until(
            lambda: (p := gw.stage_server.plan) is not None and p.nodes == (0, 3), "node 3 alone"
        )
        running = asyncio.create_task(gw.engine.run(task(tiny_model, "lied-to"), ignore))
        await c.until(lambda: NodeId(3) in gw.plans.evicted, "node 3 evicted", beats=2000)
        c.revive(1)
        await c.until(running.done, "the request", beats=4000)
        result = running.result()
        assert list(result.output_ids) == expected and result.verified == "audit"
        assert set(gw.plans.evicted) == {NodeId(3)}


def test_the_gateway_loads_a_lone_range_only_where_it_fits(tiny_model: Path) -> None:
    """A gateway out of memory re-executing a range it had no room for would take the
    cluster's front door down: the audit leaves the answer unverified instead."""
    thread = TorchThread()
    try:
        tight = Referee(tiny_model, thread, room=lambda: 1000)
        why = tight.fits(LayerRange(2, 4))
        assert "MiB free" in why and "[2, 4) needs" in why
        assert Referee(tiny_model, thread, room=lambda: 1 << 40).fits(LayerRange(2, 4)) == ""
        assert Referee(tiny_model, thread).fits(LayerRange(2, 4)) == ""  # not asked
    finally:
        thread.close()


def test_room_to_load_is_the_memory_limit_less_what_the_process_holds() -> None:
    held = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert room_to_load(held // 2) == 0  # the limit is already spent
    assert 0 < room_to_load(held + (1 << 30)) <= 1 << 30
    assert room_to_load(0) > 0  # no limit: a share of what the machine has available


@pytest.mark.parametrize("attempt", range(6))
async def test_a_request_from_a_lone_range_into_node_1s_return_is_verified(
    tiny_model: Path, tmp_path: Path, attempt: int
) -> None:
    """Node 1 dead, a request starts on the lone plan; node 1 comes back at its fourth
    token. 1 run in 6 came back unverified ("plan of epoch 2: stage 0 sent no signed
    record of step N", a review): the plan moved between the engine reading it and the
    step going out, and the step's records were filed under the older plan."""
    ids = TextCodec.load(tiny_model).encode(PROMPT)
    new = 30
    expected = list(generate([load_stage(tiny_model)], ids, new))
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        await c.first_plan()
        c.kill(1)
        await c.until(
            lambda: (p := gw.stage_server.plan) is not None and p.nodes == (0, 3), "node 3 alone"
        )
        streamed = 0

        def on_token(token: object) -> None:
            nonlocal streamed
            streamed += 1
            if streamed == 4:
                c.revive(1)

        t = InferenceTask(RequestId("r"), input_ids=tuple(ids), max_new_tokens=new)
        running = asyncio.create_task(gw.engine.run(t, on_token))
        await c.until(running.done, "the request", beats=4000)
        result = running.result()
        assert list(result.output_ids) == expected and result.verified == "audit"
        assert not gw.plans.evicted


def test_the_gateway_keeps_one_cut_of_a_layer_at_a_time(tiny_model: Path) -> None:
    """Each plan that left a different cut lone had the gateway load it and keep it:
    [1, 4), [2, 4) and [3, 4) together held more than the whole model (a review)."""
    thread = TorchThread()
    referee = Referee(tiny_model, thread, room=lambda: 1 << 40)
    try:
        x = torch.randn(1, 3, json.loads((tiny_model / "config.json").read_text())["hidden_size"])
        for start in (1, 2, 3):
            asyncio.run(referee.run(LayerRange(start, 4), x))
        assert list(referee._stages) == [LayerRange(3, 4)]
        asyncio.run(referee.run(LayerRange(0, 2), torch.tensor([[5, 9, 2]])))
        assert set(referee._stages) == {LayerRange(3, 4), LayerRange(0, 2)}  # disjoint: kept
        # loading [1, 4) drops both: it needs no more room than is free once they go
        tight = room_needed(tiny_model, LayerRange(1, 4)) - room_needed(
            tiny_model, LayerRange(3, 4)
        )
        referee._room = lambda: tight
        assert referee.fits(LayerRange(1, 4)) == ""
        asyncio.run(referee.run(LayerRange(1, 4), x))
        assert list(referee._stages) == [LayerRange(1, 4)]
    finally:
        thread.close()


def room_needed(model: Path, layers: LayerRange) -> int:
    return sum(i.memory_bytes for i in layer_infos(model)[layers.start : layers.end])
