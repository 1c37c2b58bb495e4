"""A request's generation state (`dataplane.generation`) driven in one process, as the
engine drives it, against a toy model: the logits after a token are a fixed random row
for that token, so every step's answer is known without a pipeline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from butterfly.dataplane.drafter import Draft
from butterfly.dataplane.generation import Generation
from butterfly.metrics.events import MetricsEvent, PromptChunked, Traversed
from butterfly.runtime.loader import num_layers
from butterfly.schedule.engine import PromptScored, Streamed
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.ids import RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceTask, SamplingParams

V = 13
TABLE = torch.randn(V, V, generator=torch.Generator().manual_seed(7))


def answer(gen: Generation, head: torch.Tensor) -> torch.Tensor:
    """What the last stage answers for a step: a row after each of its tokens."""
    return TABLE[head[0]].unsqueeze(0)


def greedy_after(token: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        token = int(TABLE[token].argmax())
        out.append(token)
    return out


def drive(
    gen: Generation, limit: int = 1 << 20, stop_after: int | None = None, draft: int = 0
) -> int:
    """Steps until the generation ends (or has `stop_after` tokens); `draft` > 0: each
    decode step carries that many tokens of a draft that is right once, then wrong."""
    steps = 0
    while gen.more() and (stop_after is None or len(gen.out) < stop_after):
        steps += 1
        assert steps < 100
        drafting = gen.drafting
        proposal = Draft()
        if drafting and draft and gen.budget >= draft:
            right = greedy_after(gen.history()[-1], 1)
            proposal = Draft(tuple(right + [(right[0] + 1) % V] * (draft - 1)))
        head = gen.step_input(limit, proposal.tokens)
        start = gen.pos
        assert head.shape[1] >= 1 and start + head.shape[1] <= len(gen.history()) + draft
        gen.take(answer(gen, head), head.shape[1], proposal, drafting)
    return steps


def task(
    n: int = 8, prompt: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7), **sampling: Any
) -> InferenceTask:
    return InferenceTask(
        RequestId("r"),
        input_ids=prompt,
        max_new_tokens=n,
        sampling=SamplingParams(**sampling),
    )


def test_a_chunked_prompt_then_greedy_tokens() -> None:
    events: list[MetricsEvent] = []
    gen = Generation(task(), lambda _: None, frozenset(), events.append)
    steps = drive(gen, limit=3)
    assert gen.out == greedy_after(7, 8)
    assert steps == 3 + 7  # the prompt in chunks of 3, 3 and 1; then a step a token
    assert [e.positions for e in events if isinstance(e, PromptChunked)] == [3, 3]
    # the caches hold every position but the last token's, which the next step would send
    assert gen.pos == 7 + 8 - 1 and gen.pending == 1


def test_a_rejected_draft_rolls_the_position_back() -> None:
    events: list[MetricsEvent] = []
    gen = Generation(task(12), lambda _: None, frozenset(), events.append)
    steps = drive(gen, draft=3)
    assert gen.out == greedy_after(7, 12)  # as plain decoding
    # each verify step keeps the right draft token and the model's own choice after it
    verified = [e for e in events if isinstance(e, Traversed) and e.drafted]
    assert verified and all(e.drafted == 3 and e.accepted == 1 for e in verified)
    assert steps < 1 + 11
    assert gen.pos == 7 + 12 - 1 and gen.pending == 1


def test_end_of_sequence_ends_it_with_the_token() -> None:
    chain = greedy_after(7, 8)
    eos = chain[3]
    first = chain.index(eos)
    gen = Generation(task(), lambda _: None, frozenset({eos}), lambda _: None)
    drive(gen)
    assert gen.out == chain[: first + 1] and gen.ended and not gen.more()


def test_a_checkpoint_resumes_a_sampled_request_exactly() -> None:
    sampled = task(10, temperature=1.0, seed=11)
    whole = Generation(sampled, lambda _: None, frozenset(), lambda _: None)
    drive(whole)
    first = Generation(sampled, lambda _: None, frozenset(), lambda _: None)
    drive(first, stop_after=4)
    saved = first.checkpoint(epoch=3)
    assert saved.tokens == tuple(first.out) and saved.epoch == 3
    heard: list[Streamed] = []
    second = Generation(sampled, heard.append, frozenset(), lambda _: None, saved=saved)
    assert second.resumed and heard == list(saved.tokens)  # the stream hears them again
    assert second.pending == 7 + 4  # the whole history: a successor's caches are empty
    drive(second)
    assert second.out == whole.out and len(set(whole.out)) > 2


def test_a_request_resumed_with_every_token_sends_its_history_once_to_be_audited() -> None:
    """A checkpoint that holds every token leaves nothing to generate, and a request that
    computes no step has no records to audit: it came back unverified (a review). Its
    recheck sends the history but the last token once, in chunks too, after a replay
    too, sampling nothing, and ends with the same tokens."""
    sampled = task(6, temperature=1.0, seed=5)
    whole = Generation(sampled, lambda _: None, frozenset(), lambda _: None)
    drive(whole)
    saved = whole.checkpoint(epoch=1)
    gen = Generation(sampled, lambda _: None, frozenset(), lambda _: None, saved=saved)
    assert gen.resumed and not gen.more()
    gen.recheck()
    assert gen.more() and not gen.drafting
    assert gen.step_input(100).tolist() == [gen.history()[:-1]]
    head = gen.step_input(4)  # a chunk, then a lost step: replayed from 2
    assert gen.take(answer(gen, head), 4, Draft(), False) == [] and gen.pos == 4
    gen.replay_from(2)
    assert gen.step_input(100).tolist() == [gen.history()[2:-1]]
    assert drive(gen) == 1
    assert gen.out == whole.out and gen.pos == len(gen.history()) - 1
    assert gen.checkpoint(epoch=1) == saved  # nothing drawn: the RNG where it was


def test_a_replay_sends_the_history_from_where_the_caches_hold() -> None:
    gen = Generation(task(), lambda _: None, frozenset(), lambda _: None)
    drive(gen, stop_after=3)
    gen.replay_from(5)
    assert gen.pos == 5 and gen.step_input(100).tolist() == [gen.history()[5:]]
    drive(gen)
    assert gen.out == greedy_after(7, 8)


def test_a_prompt_scored_without_new_tokens() -> None:
    heard: list[Streamed] = []
    gen = Generation(task(0, prompt_logprobs=1), heard.append, frozenset(), lambda _: None)
    steps = 0
    while gen.more():
        steps += 1
        assert steps < 10
        head = gen.step_input(4)
        rows = gen.to_score(head.shape[1])
        assert rows == head.shape[1] or gen.pos + rows == 6  # the last position scores nothing
        gen.score_prompt(answer(gen, head), rows)
        assert gen.take(answer(gen, head), head.shape[1], Draft(), False) == []
    assert gen.out == [] and gen.ended
    assert len(heard) == 1 and isinstance(heard[0], PromptScored)
    assert [s.token for s in heard[0].scores] == [2, 3, 4, 5, 6, 7]


def test_the_first_token_is_timed_before_the_sink_hears_it() -> None:
    clock: list[float] = []

    def slow_sink(_: Streamed) -> None:
        clock.append(time.perf_counter())
        time.sleep(0.05)

    gen = Generation(task(2), slow_sink, frozenset(), lambda _: None)
    before = time.perf_counter()
    drive(gen)
    assert gen.first_token_at is not None and before <= gen.first_token_at <= clock[0]


async def test_the_engines_first_token_time_leaves_out_a_slow_sink(tiny_model: Path) -> None:
    """The engine's `time_to_first_token_s` is the pipeline's, not the consumer's: a sink
    that takes 2 s over the first token does not add to it."""
    heard: list[Streamed] = []

    def slow_sink(token: Streamed) -> None:
        if not heard:
            time.sleep(2.0)
        heard.append(token)

    pipe = LocalPipeline(tiny_model, [LayerRange(0, 2), LayerRange(2, num_layers(tiny_model))])
    async with pipe:
        result = await pipe.run(task(3, prompt=(5, 17, 33, 2)), slow_sink)
    assert len(heard) == 3 and result.timings["total_s"] >= 2.0
    assert result.timings["time_to_first_token_s"] < 2.0


def drive_scoring(gen: Generation, limit: int = 1 << 20, stop_after: int = 1 << 20) -> None:
    """`drive` as the engine scores: a step with rows to score gets every row's logits."""
    steps = 0
    while gen.more() and len(gen.out) < stop_after:
        steps += 1
        assert steps < 100
        head = gen.step_input(limit)
        rows = gen.to_score(head.shape[1])
        logits = answer(gen, head)
        if rows:
            gen.score_prompt(logits, rows)
        gen.take(logits, head.shape[1], Draft(), False)


def test_a_resumed_request_reports_a_logprob_for_every_token() -> None:
    """The checkpoint keeps tokens only; the request resumed from it scores the tokens it
    already held from the rows of the prefill that resumes it (in chunks, too), so its
    logprobs are every token's, the same as a run that never stopped (before, only those
    made after the resume). The prompt's own scores are announced once, when asked."""
    for prompt_logprobs in (None, 1):
        sampling = {"temperature": 0.9, "seed": 5, "logprobs": 2}
        sampling["prompt_logprobs"] = prompt_logprobs
        events: list[Any] = []
        whole = Generation(task(**sampling), lambda _: None, frozenset(), lambda _: None)
        drive_scoring(whole)
        half = Generation(task(**sampling), lambda _: None, frozenset(), lambda _: None)
        drive_scoring(half, stop_after=3)  # a gateway that checkpointed, then died
        saved = half.checkpoint(epoch=1)
        resumed = Generation(
            task(**sampling), events.append, frozenset(), lambda _: None, saved=saved
        )
        drive_scoring(resumed, limit=4)
        assert resumed.out == whole.out
        assert resumed.logprobs() == whole.logprobs()
        assert [s.token for s in resumed.logprobs()] == resumed.out
        announced = [e for e in events if isinstance(e, PromptScored)]
        assert len(announced) == (0 if prompt_logprobs is None else 1)


def test_an_echo_resumed_with_every_token_makes_no_token_more() -> None:
    """A checkpoint holding every token but not the prompt's scores: the resumed request
    needs a step to score the prompt again (no recheck), and that step sampled one token
    more than max_new_tokens, one the dead gateway never made (a review). It scores the
    prompt and the tokens, and samples nothing."""
    for logprobs in (None, 2):
        sampling = {"temperature": 1.0, "seed": 5, "prompt_logprobs": 1, "logprobs": logprobs}
        whole = Generation(task(6, **sampling), lambda _: None, frozenset(), lambda _: None)
        drive_scoring(whole)
        assert len(whole.out) == 6
        saved = whole.checkpoint(epoch=1)  # the dead gateway's last: every token
        events: list[Any] = []
        resumed = Generation(
            task(6, **sampling), events.append, frozenset(), lambda _: None, saved=saved
        )
        assert resumed.resumed and resumed.more()  # the prompt is still to be scored
        drive_scoring(resumed)
        assert resumed.out == whole.out  # not one token more
        assert resumed.logprobs() == whole.logprobs()
        assert [e for e in events if isinstance(e, PromptScored)] == [
            PromptScored(whole.prompt_scores.scores())  # type: ignore[union-attr]
        ]
