"""A prompt's logprobs (echo with logprobs) and stop strings, in the engine itself.

The last stage answers every prompt position's logits only for a request that asks
(`SamplingParams.prompt_logprobs`), in chunks as the prefill goes, and under `audit` its
signed record of that step covers every position, so an honest chain still passes its
audit. A task's stop strings end the generation in the engine, as end of sequence does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.sampling import PromptScores
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.drafts import Speculation
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.errors import InvalidInput
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceTask, SamplingParams
from butterfly.types.wire.data import StageStep
from butterfly.types.wire.frames import Message

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
PROMPT = "Once upon a time there was"
TOLERANCE = 1e-4  # float32 log-probabilities, split stages against transformers
K = 2


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def hf_scores(model: Path, ids: list[int]) -> tuple[list[float], torch.Tensor]:
    """Each prompt token's logprob (from the second) and the top-K values, by transformers."""
    hf = LlamaForCausalLM.from_pretrained(model).eval()
    with torch.no_grad():
        rows = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    chosen = rows.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    return chosen, torch.topk(rows, K).values


def test_prompt_scores_ask_only_for_rows_not_scored_yet() -> None:
    scores = PromptScores([5, 6, 7, 8, 9], 1)
    assert scores.wanted(0, 2) == 2  # positions 0, 1 score tokens 1, 2
    scores.add(0, torch.zeros(2, 10))
    assert scores.wanted(2, 3) == 2  # position 4 is the last: it scores no prompt token
    scores.add(2, torch.zeros(2, 10))
    assert [s.token for s in scores.scores()] == [6, 7, 8, 9]
    assert scores.wanted(0, 5) == 0  # a replay after the prompt was scored asks nothing
    assert PromptScores([5], 1).wanted(0, 1) == 0  # one token: nothing to score


@pytest.mark.parametrize("chunk", [0, 3])
async def test_prompt_logprobs_match_transformers_whole_or_in_chunks(
    tiny_model: Path, chunk: int
) -> None:
    codec = TextCodec.load(tiny_model)
    ids = codec.encode(PROMPT)
    chosen, best = hf_scores(tiny_model, ids)
    async with LocalPipeline(tiny_model, [LayerRange(0, 2), LayerRange(2, 4)]) as pipe:
        pipe.engine.retune_generation(speculation=Speculation(), prefill_chunk=chunk)
        sampling = SamplingParams(prompt_logprobs=K)
        task = InferenceTask(
            RequestId(f"p{chunk}"), tuple(ids), max_new_tokens=3, sampling=sampling
        )
        result = await pipe.engine.run(task, lambda t: None)
        plain = await pipe.engine.run(
            InferenceTask(RequestId(f"q{chunk}"), tuple(ids), max_new_tokens=3), lambda t: None
        )
    assert [s.token for s in result.prompt_logprobs] == ids[1:]
    assert [s.logprob for s in result.prompt_logprobs] == pytest.approx(chosen, abs=TOLERANCE)
    for s, top in zip(result.prompt_logprobs, best.tolist(), strict=True):
        assert [v for _, v in s.top] == pytest.approx(top, abs=TOLERANCE)
    assert result.output_ids == plain.output_ids  # scoring the prompt changes no token
    assert plain.prompt_logprobs == ()  # not asked: none


class WatchedPipeline(LocalPipeline):
    """A local pipeline that keeps every step it hands a stage."""

    steps: list[StageStep]

    async def deliver(self, peer: NodeId, msg: Message, payload: bytes) -> None:
        if isinstance(msg, StageStep):
            self.steps.append(msg)
        await super().deliver(peer, msg, payload)


async def test_only_a_request_that_asks_gets_every_prompt_row(tiny_model: Path) -> None:
    """Without prompt logprobs every step asks the last stage for its last row only, so
    a plain request costs what it did; with them, the prefill asks for every row."""
    ids = tuple(TextCodec.load(tiny_model).encode(PROMPT))
    pipe = WatchedPipeline(tiny_model, [LayerRange(0, 2), LayerRange(2, 4)])
    pipe.steps = []
    async with pipe:
        await pipe.run(InferenceTask(RequestId("plain"), ids, max_new_tokens=2), lambda t: None)
        assert pipe.steps and all(m.last_only for m in pipe.steps)
        pipe.steps.clear()
        asked = SamplingParams(prompt_logprobs=0)
        await pipe.run(
            InferenceTask(RequestId("a"), ids, max_new_tokens=2, sampling=asked), lambda t: None
        )
        # per stage: the prefill with every row, then one decode with its last row
        assert [m.last_only for m in pipe.steps] == [False, False, True, True]


async def test_an_honest_chain_passes_its_audit_with_prompt_logprobs_and_stops(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Under `audit`, the last stage's record of the prefill covers every prompt row; the
    auditors check it on all of them, the request is verified and nobody is evicted. Its
    stop string ends the generation where its text first holds it. A request that only
    scores its prompt (no new token) is audited the same way."""
    codec = TextCodec.load(tiny_model)
    ids = codec.encode(PROMPT)
    chosen, _ = hf_scores(tiny_model, ids)
    full = list(generate([load_stage(tiny_model)], ids, 12, stop_ids=codec.eos_ids))
    text = codec.decode(full)
    at = next(i for i in range(2, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    stop = text[at : at + 2]
    needed = next(n for n in range(1, len(full) + 1) if stop in codec.decode(full[:n]))
    settings = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": "audit"}
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        gw = c.gateway
        await c.first_plan()
        task = InferenceTask(
            RequestId("echo"),
            tuple(ids),
            max_new_tokens=12,
            stop=(stop,),
            sampling=SamplingParams(prompt_logprobs=K),
        )
        run = asyncio.create_task(gw.engine.run(task, lambda t: None))
        await c.until(run.done, "the request to finish", beats=2000)
        result = run.result()
        assert result.verified == "audit"
        assert [s.logprob for s in result.prompt_logprobs] == pytest.approx(chosen, abs=TOLERANCE)
        assert list(result.output_ids) == full[:needed]
        only = InferenceTask(  # an echo of max_tokens 0: the prefill alone, audited too
            RequestId("score"),
            tuple(ids),
            max_new_tokens=0,
            sampling=SamplingParams(prompt_logprobs=K),
        )
        run = asyncio.create_task(gw.engine.run(only, lambda t: None))
        await c.until(run.done, "the scoring request to finish", beats=2000)
        scored = run.result()
        assert scored.output_ids == () and scored.verified == "audit"
        assert [s.logprob for s in scored.prompt_logprobs] == pytest.approx(chosen, abs=TOLERANCE)
        assert all(not node.plans.evicted for node in c.nodes)


async def test_replicate_mode_refuses_prompt_logprobs_clearly(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Replicate lanes are compared on their last row only, so the prompt's rows would
    go unchecked: such a request is refused, saying why and what to do instead."""
    ids = tuple(TextCodec.load(tiny_model).encode(PROMPT))
    settings = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": "replicate"}
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        gw = c.gateway
        await c.first_plan()
        asked = SamplingParams(prompt_logprobs=1)
        task = InferenceTask(RequestId("rep"), ids, max_new_tokens=2, sampling=asked)
        with pytest.raises(InvalidInput, match=r"replicate.*without echo"):
            await gw.engine.run(task, lambda t: None)
