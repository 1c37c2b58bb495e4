"""generation.speculative and generation.prefill_chunk change what a running gateway does:
whole nodes in one process (butterfly.testing.inprocess), the setting changed through the
gateway's config manager as an operator's update would, the traversals counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from butterfly.config.issues import ConfigInvalid
from butterfly.config.reload import ConfigManager
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceResult, InferenceTask

pytestmark = pytest.mark.timeout(120)
SETTINGS = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": "none"}
EDIT = (
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "# the same, renamed:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
)
NEW = 40


def change(manager: ConfigManager, patch: dict[str, Any]) -> None:
    result = manager.update(patch)
    if result.pending is not None:
        manager.apply_committed(result.pending, manager.history.last_cluster_seq() + 1)


async def test_switching_speculation_and_chunking_on_changes_the_traversals(
    tiny_model: Path, tmp_path: Path
) -> None:
    prompt = tuple(TextCodec.load(tiny_model).encode(EDIT))
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=SETTINGS) as c:
        gw = c.gateway
        await c.first_plan()
        assert gw.engine.verification == "none"

        async def request(name: str) -> InferenceResult:
            task = InferenceTask(RequestId(name), prompt, max_new_tokens=NEW)
            return await c.infer(task, beats=400)

        plain = await request("plain")
        assert plain.timings["traversals"] == len(plain.output_ids) == NEW
        change(gw.config, {"generation.speculative.mode": "ngram"})
        spec = await request("ngram")
        assert spec.output_ids == plain.output_ids
        assert spec.timings["traversals"] < NEW
        change(gw.config, {"generation.speculative.k": 1})  # 2 tokens a traversal at most
        one = await request("k1")
        assert one.output_ids == plain.output_ids
        assert NEW / 2 <= one.timings["traversals"] < NEW
        change(gw.config, {"generation.speculative.k": 8})
        eight = await request("k8")
        assert eight.output_ids == plain.output_ids
        assert eight.timings["traversals"] < NEW / 2  # more than 2 tokens a traversal
        change(gw.config, {"generation.speculative.mode": "off", "generation.prefill_chunk": 16})
        chunked = await request("chunked")
        assert chunked.output_ids == plain.output_ids
        assert chunked.timings["traversals"] == -(-len(prompt) // 16) + NEW - 1


async def test_mode_draft_runs_on_the_draft_model_given_at_start_and_is_refused_without(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A gateway started with generation.speculative.draft_model switches to mode "draft"
    and drafts with it (the served model drafting for itself confirms nearly every
    draft); one started without refuses the mode by name and keeps decoding plainly."""
    prompt = tuple(TextCodec.load(tiny_model).encode("a plain sentence that does not repeat"))
    drafting = {**SETTINGS, "generation.speculative.draft_model": str(tiny_model)}
    async with InProcessCluster(tiny_model, 4, tmp_path / "a", f=1, settings=drafting) as c:
        gw = c.gateway
        await c.first_plan()

        async def request(name: str) -> InferenceResult:
            task = InferenceTask(RequestId(name), prompt, max_new_tokens=NEW)
            return await c.infer(task, beats=400)

        plain = await request("plain")
        assert plain.timings["traversals"] == NEW
        change(gw.config, {"generation.speculative.mode": "draft", "generation.speculative.k": 4})
        drafted = await request("drafted")
        assert drafted.output_ids == plain.output_ids
        assert drafted.timings["traversals"] < NEW / 2
        change(gw.config, {"generation.speculative.mode": "off"})
        assert (await request("off")).timings["traversals"] == NEW
    async with InProcessCluster(tiny_model, 4, tmp_path / "b", f=1, settings=SETTINGS) as c:
        gw = c.gateway
        await c.first_plan()
        with pytest.raises(ConfigInvalid, match=r"generation\.speculative\.draft_model"):
            change(gw.config, {"generation.speculative.mode": "draft"})
        assert gw.config.current.generation.speculative.mode == "off"
