"""byzantine.fingerprint_top_k raised on a running cluster: the gateway sizes its steps
for the larger records (it kept sizing them for the top_k it started with, and every
prompt longer than that size allowed failed, its header over 64 KiB), and its audit
accepts the shape before for the grace, whatever else changes meanwhile."""

from __future__ import annotations

from pathlib import Path

import pytest

from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask
from tests.test_speculative_live import change

pytestmark = pytest.mark.timeout(120)


async def test_a_larger_fingerprint_still_serves_a_long_prompt(
    tiny_model: Path, tmp_path: Path
) -> None:
    settings = {"coordination.heartbeat_interval_ms": 10}
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        await c.first_plan()
        for node in c.nodes:  # the agreed change, applied on every node
            change(node.config, {"byzantine.fingerprint_top_k": 256})
        prompt = tuple(i % 250 + 3 for i in range(260))  # 12 positions a step fit at top_k 256
        task = InferenceTask(RequestId("long"), prompt, max_new_tokens=2)
        result = await c.infer(task, beats=800)
        assert len(result.output_ids) == 2 and result.verified == "audit"


async def test_an_unrelated_change_keeps_the_fingerprint_grace(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A raised fingerprint_top_k is taken by each node at its own moment, so for
    SHAPE_GRACE_S the gateway's audit still accepts records of the shape before. Every
    config change retunes the engine: an unrelated one during the grace (a label here)
    re-applied the same shape and restarted it as "no change", so the stage nodes' records
    of the shape before were judged weak and the request came back unverified."""
    settings = {"coordination.heartbeat_interval_ms": 10}
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        await c.first_plan()
        # the agreed raise, taken by the gateway first; nodes 1-3 have not taken it yet
        change(c.gateway.config, {"byzantine.fingerprint_top_k": 16})
        prompt = tuple(range(3, 12))
        first = await c.infer(InferenceTask(RequestId("a"), prompt, max_new_tokens=2))
        assert first.verified == "audit"  # within the grace: the shape before passes
        change(c.gateway.config, {"node.name": "gateway"})  # a label, nothing else
        second = await c.infer(InferenceTask(RequestId("b"), prompt, max_new_tokens=2))
        assert second.verified == "audit", second.verified
