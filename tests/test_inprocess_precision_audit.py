"""Audits in reduced precision blame liars, not honest nodes.

In bfloat16 an auditor's one-pass prefill and the chain's token-by-token decode differ by
up to ~1% of the activations' scale; with float32's tolerance (rtol 1e-3) the referee
sided with the auditor and honest chain node 1 was evicted. The verification tolerance is
widened to the compute dtype's floor (`runtime.precision.VERIFICATION_FLOORS`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from butterfly.protocol.proof import Tolerance, tensors_close, tolerance_for
from butterfly.runtime.precision import verification_floor
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import CorruptStageServer
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.tasks import InferenceTask

pytestmark = pytest.mark.timeout(120)
BF16 = {"coordination.heartbeat_interval_ms": 10, "model.dtype": "bfloat16"}
PROMPTS = ("Once upon a time there was", "The quick brown fox", "In a hole in the ground")


def task(model: Path, n: int) -> InferenceTask:
    ids = tuple(TextCodec.load(model).encode(PROMPTS[n % len(PROMPTS)]))
    return InferenceTask(RequestId(f"request-{n}"), input_ids=ids, max_new_tokens=24)


@pytest.mark.parametrize(
    "settings",
    [
        BF16,
        {"coordination.heartbeat_interval_ms": 10, "byzantine.rtol": 0.0, "byzantine.atol": 0.0},
    ],
    ids=["bfloat16", "float32-zero-tolerance"],
)
async def test_honest_nodes_pass_their_audits(
    tiny_model: Path, tmp_path: Path, settings: dict[str, object]
) -> None:
    """Also in float32 with rtol = atol = 0, which the schema allows: its drift (below 1e-4
    of the scale) had honest nodes evicted, two of them at f = 1."""
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        gw = c.gateway
        await c.first_plan()
        for n in range(len(PROMPTS)):
            run = asyncio.create_task(gw.engine.run(task(tiny_model, n), lambda t: None))
            await c.until(run.done, f"request {n} to finish")
            assert run.result().verified == "audit"
        assert all(not node.plans.evicted for node in c.nodes)


async def test_a_bfloat16_liar_is_still_evicted(tiny_model: Path, tmp_path: Path) -> None:
    liar = {1: CorruptStageServer}
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=BF16, stage_servers=liar
    ) as c:
        gw = c.gateway
        await c.first_plan()
        run = asyncio.create_task(gw.engine.run(task(tiny_model, 0), lambda t: None))
        await c.until(run.done, "the request to finish")
        assert run.result().verified == "audit"
        await c.until(
            lambda: all(set(node.plans.evicted) == {NodeId(1)} for node in c.nodes),
            "every node to record node 1's eviction, and only its",
        )


def test_the_floor_widens_bfloat16_most() -> None:
    assert tolerance_for(1e-3, 1e-4, verification_floor("float32")).rtol == 1e-3
    wide = tolerance_for(1e-3, 1e-4, verification_floor("bfloat16"))
    assert wide.rtol == wide.scaled == 2**-5
    reference = torch.tensor([10.0, 0.0])
    drifted = torch.tensor([10.1, 0.09])  # ~1% of the scale, where the value is ~0
    assert tensors_close(drifted, reference, wide)
    assert not tensors_close(drifted, reference, Tolerance())
    assert not tensors_close(torch.tensor([10.0, 0.5]), reference, wide)  # a lie's size
