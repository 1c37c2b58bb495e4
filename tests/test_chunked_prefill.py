"""Chunked prefill: a long prompt goes down the chain in chunks, each batched with the
decode steps of the streams running, so they go on producing tokens while it arrives."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from butterfly.dataplane.stage_server import Outbound
from butterfly.net.framing import Envelope
from butterfly.runtime.loader import num_layers
from butterfly.schedule.drafts import Speculation
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.ids import RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.data import StageStep

pytestmark = pytest.mark.timeout(120)
LONG, CHUNK = 200, 16


@pytest.mark.parametrize("chunk", [0, CHUNK])
async def test_a_long_prompt_in_chunks_shares_its_steps_with_a_running_stream(
    tiny_model: Path, chunk: int
) -> None:
    n = num_layers(tiny_model)
    async with LocalPipeline(tiny_model, [LayerRange(0, 2), LayerRange(2, n)]) as pipe:
        pipe.engine.retune_generation(speculation=Speculation(), prefill_chunk=chunk)
        first = pipe.servers[next(iter(pipe.servers))]
        steps: list[StageStep] = []
        on_step = first.on_step

        async def recorded(env: Envelope) -> Outbound:
            if isinstance(env.msg, StageStep):
                steps.append(env.msg)
            return await on_step(env)

        first.on_step = recorded  # type: ignore[method-assign]
        stream: list[int] = []
        long: list[int] = []
        running = asyncio.create_task(
            pipe.run(
                InferenceTask(RequestId("stream"), (1, 2, 3), max_new_tokens=200), stream.append
            )
        )
        while len(stream) < 3:
            await asyncio.sleep(0.001)
        before = len(stream)
        prompt = tuple(range(3, 3 + LONG))
        await pipe.run(InferenceTask(RequestId("long"), prompt, max_new_tokens=1), long.append)
        during = len(stream) - before  # the stream's tokens while the prompt went down
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    at = [i for i, s in enumerate(steps) if "long" in s.request_ids]
    long_steps = [steps[i] for i in at]
    # the stream's decode steps that stage 0 ran between the prompt's first and last step
    # (batched with a chunk, or between two chunks)
    between = [s for s in steps[at[0] : at[-1] + 1] if "stream" in s.request_ids]
    if chunk:
        assert len(long_steps) == -(-LONG // CHUNK)
        assert all(s.lengths[s.request_ids.index("long")] <= CHUNK for s in long_steps)
        assert len(between) >= len(long_steps) - 2  # interleaved, nearly one per chunk
        assert during >= len(long_steps) - 2
    else:
        only = long_steps[0]
        assert len(long_steps) == 1 and only.lengths[only.request_ids.index("long")] == LONG
        assert len(between) <= 1
        # the stream waited for the whole prompt (a step or two more where micro-batches
        # let its step pass stage 1 while stage 0 held the prompt), against 11+ in chunks
        assert during <= 4
