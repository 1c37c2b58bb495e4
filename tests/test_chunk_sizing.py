"""A prompt's chunks are sized from measured step times (`schedule.chunks`): short enough
that the streams decoding beside it wait at most a fraction of a decode step more, as long
as configured when nobody decodes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from butterfly.dataplane.stage_server import Outbound
from butterfly.metrics.events import MetricsEvent, PromptChunked
from butterfly.net.framing import Envelope
from butterfly.runtime.loader import num_layers
from butterfly.schedule.chunks import GAP_BUDGET, MIN_CHUNK, ChunkTimes, chunk_length
from butterfly.schedule.drafts import Speculation
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.data import StageStep

pytestmark = pytest.mark.timeout(120)


def test_a_chunk_adds_at_most_the_budget_of_a_decode_step() -> None:
    times = ChunkTimes(decode_s=0.040, position_s=0.001, streams={"s"})
    assert chunk_length(64, times, "p") == int(GAP_BUDGET * 40)  # 30 positions of 1 ms
    assert chunk_length(16, times, "p") == 16  # never over the configured length
    times.position_s = 0.010  # a slower CPU's positions: 3 fit, but a chunk has 8 at least
    assert chunk_length(64, times, "p") == MIN_CHUNK
    assert chunk_length(4, times, "p") == 4  # a configured length under the floor stands


def test_nobody_decoding_or_nothing_measured_leaves_the_configured_length() -> None:
    assert chunk_length(32, ChunkTimes(decode_s=0.04, position_s=0.01), "p") == 32
    # the request itself does not count: a replay after recovery is not held to its own gap
    assert chunk_length(32, ChunkTimes(decode_s=0.04, position_s=0.01, streams={"p"}), "p") == 32
    assert chunk_length(32, ChunkTimes(position_s=0.01, streams={"s"}), "p") == 32
    assert chunk_length(32, ChunkTimes(decode_s=0.04, streams={"s"}), "p") == 32
    assert chunk_length(0, ChunkTimes(decode_s=0.04, position_s=0.01, streams={"s"}), "p") == 0


def test_decode_steps_that_shared_a_chunks_time_are_not_the_baseline() -> None:
    times = ChunkTimes()
    clean = times.started("s", 1, stream=True)
    times.ended(clean, 0.040)
    assert times.decode_s == pytest.approx(0.040)
    # a decode step that left while a chunk was in flight
    chunk = times.started("p", 32, stream=False)
    during = times.started("s", 1, stream=True)
    times.ended(during, 0.500)
    # one that left before a chunk did, and ended after it
    times.ended(chunk, 0.040 + 32 * 0.002)
    before = times.started("s", 1, stream=True)
    later = times.started("p", 32, stream=False)
    times.ended(before, 0.500)
    times.ended(later, None)  # lost: nothing measured, no longer in flight
    assert times.decode_s == pytest.approx(0.040)
    assert times.position_s == pytest.approx(0.002)
    assert times.in_flight == 0
    verify = times.started("s", 0, stream=True)  # a speculative verify step: not timed
    times.ended(verify, 9.0)
    assert times.decode_s == pytest.approx(0.040)
    times.finished("s")
    assert times.streams == set()


def test_a_position_cost_follows_the_latest_chunks() -> None:
    times = ChunkTimes(decode_s=0.010)
    for seconds in (0.010 + 16 * 0.001, 0.010 + 16 * 0.004, 0.010 + 16 * 0.004):
        times.ended(times.started("p", 16, stream=False), seconds)
    assert 0.001 < (times.position_s or 0) < 0.004  # moving toward the later cost


def test_chunks_faster_than_a_decode_step_leave_the_configured_length() -> None:
    """A decode baseline from a busy moment and thousands of quick prompts after it: the
    cost of a position decays toward 0, and the size must not divide by it."""
    times = ChunkTimes()
    times.ended(times.started("s", 1, stream=True), 0.2)
    times.ended(times.started("p", 16, stream=False), 0.2 + 16 * 0.001)
    for _ in range(2100):
        times.ended(times.started("p", 16, stream=False), 0.05)
    times.streams.add("s")
    assert chunk_length(32, times, "p") == 32


def test_only_requests_decoding_are_streams() -> None:
    times = ChunkTimes(decode_s=0.04, position_s=0.004)
    decode = times.started("a", 1, stream=True)
    times.started("b", 1, stream=True)
    assert chunk_length(32, times, "p") == MIN_CHUNK
    times.ended(decode, None)  # a lost step: "a" waits for a plan, then replays
    replay = times.started("b", 40, stream=True)  # "b" replays its history
    assert times.streams == set() and chunk_length(32, times, "p") == 32
    times.ended(replay, None)
    times.started("b", 1, stream=True)  # decoding again
    assert times.streams == {"b"}
    times.finished("b")
    assert chunk_length(32, times, "p") == 32


async def _long_steps(
    pipe: LocalPipeline, prompt: tuple[int, ...], stream: bool
) -> tuple[list[int], tuple[int, ...]]:
    """The prompt's step lengths at the first stage, with a stream decoding beside it or
    not, and the token it gives."""
    first = pipe.servers[next(iter(pipe.servers))]
    lengths: list[int] = []
    on_step = first.on_step

    async def recorded(env: Envelope, route: tuple[NodeId, ...] = ()) -> Outbound:
        msg = env.msg
        if isinstance(msg, StageStep) and "long" in msg.request_ids:
            lengths.append(msg.lengths[msg.request_ids.index("long")])
        return await on_step(env, route)

    first.on_step = recorded  # type: ignore[method-assign]
    running = None
    if stream:
        tokens: list[object] = []
        task = InferenceTask(RequestId("stream"), (1, 2, 3), max_new_tokens=400)
        running = asyncio.create_task(pipe.run(task, tokens.append))
        for _ in range(2000):  # bounded: the stream has its first tokens within seconds
            if len(tokens) >= 3:
                break
            await asyncio.sleep(0.005)
        assert len(tokens) >= 3
    # measured as a slow CPU would measure them: a position costs as much as a decode step
    pipe.engine.chunk_times.decode_s = pipe.engine.chunk_times.position_s = 1.0
    task = InferenceTask(RequestId("long"), prompt, max_new_tokens=1)
    result = await pipe.run(task, lambda t: None)
    if running is not None:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    first.on_step = on_step  # type: ignore[method-assign]
    return lengths, tuple(result.output_ids)


async def test_chunks_shrink_only_while_a_stream_decodes(tiny_model: Path) -> None:
    n = num_layers(tiny_model)
    prompt = tuple(range(3, 67))
    events: list[MetricsEvent] = []
    ranges = [LayerRange(0, 2), LayerRange(2, n)]
    async with LocalPipeline(tiny_model, ranges, emit=events.append) as pipe:
        task = InferenceTask(RequestId("whole"), prompt, max_new_tokens=1)
        whole = tuple((await pipe.run(task, lambda t: None)).output_ids)
        pipe.engine.retune_generation(speculation=Speculation(), prefill_chunk=32)
        alone, token_alone = await _long_steps(pipe, prompt, stream=False)
        beside, token_beside = await _long_steps(pipe, prompt, stream=True)
    assert alone == [32, 32]  # nobody decoding: the configured length
    assert beside[0] == MIN_CHUNK  # a position as dear as a decode step: the fewest
    assert sum(beside) == len(prompt) and max(beside) <= 32 and len(beside) >= 5
    assert token_alone == token_beside == whole
    # butterfly_prompt_chunk_positions sees every chunk but each prompt's last step
    chunked = [e.positions for e in events if isinstance(e, PromptChunked)]
    assert chunked == alone[:-1] + beside[:-1]
