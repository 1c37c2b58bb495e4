"""A checkpoint that cannot be loaded is refused, saying why, and blames nobody.

In whole nodes in one process (butterfly.testing.inprocess), n = 4, f = 1. A checkpoint
no node can load (a tensor of the wrong shape) leaves no plan in force: `/health` says
not healthy, with the load error, and a request fails at once with it (503), where the
gateway kept a plan half its holders never loaded, reported itself healthy, and a
request hung for a minute before an unrelated error (a review). A node whose own copy
is broken, the gateway included, is left out of the plan and the others serve.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from butterfly.api.app import health_body
from butterfly.dataplane.stage_server import StageServer
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.errors import ServiceUnavailable
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.control import PlanAck, PlanAssign

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]
SETTINGS = {"coordination.heartbeat_interval_ms": 10}
BAD = "model.layers.3.self_attn.k_proj.weight"  # [32, 64] in the tiny model's config
PROMPT = "Once upon a time"
NEW = 8


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def bad_checkpoint(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model with one tensor saved in a shape its config does not imply."""
    path = tmp_path / "bad"
    shutil.copytree(tiny_model, path)
    tensors = load_file(path / "model.safetensors")
    tensors[BAD] = torch.zeros(64, 64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def task(model: Path, name: str) -> InferenceTask:
    ids = tuple(TextCodec.load(model).encode(PROMPT))
    return InferenceTask(RequestId(name), input_ids=ids, max_new_tokens=NEW)


async def test_a_checkpoint_no_node_can_load_is_reported_and_refused(
    bad_checkpoint: Path, tmp_path: Path
) -> None:
    async with InProcessCluster(bad_checkpoint, 4, tmp_path / "c", f=1, settings=SETTINGS) as c:
        await c.first_plan()  # the gateway's own layers load: the others' do not
        engine, recovery = c.gateway.engine, c.gateway.recovery
        await c.until(lambda: not engine.health().healthy, "health saying why", beats=400)
        gateway = c.gateway.gateway
        assert gateway is not None
        # the gateway acts on, answering (it stopped, and its engine said "cannot schedule
        # new futures after shutdown")
        await c.until(lambda: gateway.scheduler is not None, "the gateway serving its API")
        assert gateway.scheduler is not None
        body = health_body(engine.health(), gateway.scheduler)  # `GET /health`, a 503
        assert not body["healthy"] and body["services"]["plan"] == "down"
        assert BAD in body["unserved"] and "(64, 64)" in body["unserved"]
        with pytest.raises(ServiceUnavailable, match=BAD):  # at once, not after a minute
            await asyncio.wait_for(engine.run(task(bad_checkpoint, "r"), lambda t: None), 5.0)
        # nodes that cannot load their layers are not liars, nor withholding
        assert not recovery.evicted
        assert not any(recovery.suspended(NodeId(n)) for n in range(4))


class BrokenCopy(StageServer):
    """An honest node whose own copy of the checkpoint is damaged: it refuses every plan
    that gives it layers, with the loader's error."""

    async def apply_plan(self, msg: PlanAssign) -> PlanAck:
        if StagePlan.from_message(msg).layers_of(self.node) is None:
            return await super().apply_plan(msg)
        why = f"tensor {BAD!r} has shape (64, 64), the config implies (32, 64)"
        return PlanAck(msg.epoch, self.node, False, why)


@pytest.mark.parametrize("broken", [0, 3], ids=["the-gateway", "a-member"])
async def test_a_node_with_a_broken_copy_is_left_out_and_the_others_serve(
    tiny_model: Path, tmp_path: Path, broken: int
) -> None:
    codec = TextCodec.load(tiny_model)
    expected = generate([load_stage(tiny_model)], codec.encode(PROMPT), NEW, stop_ids=codec.eos_ids)
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=SETTINGS, stage_servers={broken: BrokenCopy}
    ) as c:
        gw = c.gateway

        def served_without_it() -> bool:
            plan = gw.stage_server.plan
            return plan is not None and broken not in plan.members and gw.engine.health().healthy

        await c.until(served_without_it, f"a plan without node {broken}", beats=400)
        result = await c.infer(task(tiny_model, "served"))
        assert list(result.output_ids) == list(expected)
        assert gw.engine.health().healthy
        assert not gw.recovery.evicted and not gw.recovery.suspended(NodeId(broken))
