"""An audit of a sequence of any length the model takes gets its answers: the auditor's
reply carries its outputs, not a signed record fingerprinting every position, which
outgrew the 64 KiB frame header at about 1,000 positions (64 bytes each at
byzantine.fingerprint_top_k 8): the reply was never sent, the request waited out the
audit's timeout, and the honest auditor was counted as silent."""

from __future__ import annotations

from pathlib import Path

import pytest

from butterfly.net.framing import MAX_HEADER
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask

pytestmark = pytest.mark.timeout(120)
TOP_K = 32  # 256 bytes of fingerprint a position: the tiny model's context reaches 64 KiB
PROMPT = 400


async def test_a_sequence_whose_fingerprints_outgrow_a_frame_header_is_audited(
    tiny_model: Path, tmp_path: Path
) -> None:
    assert PROMPT * TOP_K * 8 > MAX_HEADER  # a record of it would not fit one header
    settings = {
        "coordination.heartbeat_interval_ms": 10,
        "byzantine.verification": "audit",
        "byzantine.fingerprint_top_k": TOP_K,
    }
    prompt = tuple(3 + i % 250 for i in range(PROMPT))
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        await c.first_plan()
        results = [
            await c.infer(
                InferenceTask(RequestId(f"long-{i}"), prompt, max_new_tokens=4), beats=1000
            )
            for i in range(2)
        ]
        assert all(not node.plans.evicted for node in c.nodes)
    assert [r.verified for r in results] == ["audit", "audit"]
    assert results[0].output_ids == results[1].output_ids
