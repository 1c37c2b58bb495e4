"""Speculative decoding: drafts from the request's own text, the acceptance rule, and the
pipeline giving plain decoding's greedy tokens at every split, in fewer traversals."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from butterfly.dataplane.speculate import confirm, kept_until_stop
from butterfly.runtime.loader import num_layers
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.drafts import (
    FLOOR,
    MIN_NGRAM,
    SINGLE_HITS,
    Speculation,
    draft,
    draft_length,
    longest_match,
    ngram_draft,
    single_hits,
)
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.ids import RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceResult, InferenceTask, SamplingParams

pytestmark = pytest.mark.timeout(120)

tokens_st = st.lists(st.integers(0, 6), max_size=60)


@given(tokens_st, st.integers(0, 8))
def test_a_draft_is_what_followed_an_earlier_occurrence_of_the_last_tokens(
    tokens: list[int], k: int
) -> None:
    got = ngram_draft(tokens, k)
    assert len(got) <= k
    if not got:
        return
    end = len(tokens)
    assert len(got) == k  # a match copies on into the draft itself
    text = tokens + list(got)  # the draft is the text after the match, its own end included
    assert any(
        tokens[j : j + n] == tokens[end - n :] and tuple(text[j + n : j + n + k]) == got
        for n in range(1, 4)
        for j in range(end - n)
    )


@given(st.lists(st.integers(0, 1000), min_size=2, max_size=40, unique=True), st.data())
def test_a_copy_of_earlier_text_is_drafted_as_its_continuation(
    text: list[int], data: st.DataObject
) -> None:
    """Text of distinct tokens, then a copy of its first i tokens: the draft goes on
    copying (the edit and extraction workloads speculation is for)."""
    i = data.draw(st.integers(1, len(text) - 1))
    k = data.draw(st.integers(1, 8))
    assert ngram_draft(text + text[:i], k) == tuple((text * 10)[i : i + k])


@given(st.lists(st.integers(0, 1000), max_size=40, unique=True), st.integers(0, 8))
def test_text_that_never_repeats_drafts_nothing(text: list[int], k: int) -> None:
    assert ngram_draft(text, k) == ()


@given(tokens_st, st.integers(-2, 8), st.integers(0, 8))
def test_the_draft_keeps_to_the_budget_and_the_mode(tokens: list[int], budget: int, k: int) -> None:
    on = draft(tokens, Speculation("ngram", k), budget)
    assert len(on) <= max(0, min(k, budget))
    full = ngram_draft(tokens, min(k, budget)) if budget > 0 else ()
    assert on == full[: len(on)]  # the longest match's continuation, cut to its length
    n, _ = longest_match(tokens)
    if full and (n >= MIN_NGRAM or single_hits(tokens) >= SINGLE_HITS):
        assert len(on) == draft_length(n, min(k, budget))  # as long as the match says
    else:  # no match, or a 1-token one where such lookups have not held lately
        assert on == ()
    assert draft(tokens, Speculation("off", k), budget) == ()


@given(st.lists(st.integers(0, 3), max_size=80), st.integers(1, 40), st.integers(1, 3))
def test_the_longest_match_is_the_longest_suffix_seen_before_at_its_latest_place(
    tokens: list[int], most: int, least: int
) -> None:
    """Against the definition, by brute force: the longest n whose suffix occurs earlier,
    and just after its latest earlier occurrence."""
    end = len(tokens)
    seen = [
        (n, j + n)
        for n in range(least, min(most, end - 1) + 1)
        for j in range(end - n)
        if tokens[j : j + n] == tokens[end - n :]
    ]
    want = max(seen) if seen else (0, 0)  # longest n, then the latest place
    assert longest_match(tokens, max_ngram=most, min_ngram=least) == want


@given(st.integers(0, 64), st.integers(1, 32))
def test_the_draft_grows_with_the_match_within_k(match: int, k: int) -> None:
    """The adaptive length: a longer copy so far drafts at least as far (the recent
    drafts' acceptance, read from the text), never past k, and a fresh match still
    drafts FLOOR tokens when k allows."""
    length = draft_length(match, k)
    assert min(FLOOR, k) <= length <= k
    assert draft_length(match + 1, k) >= length
    assert draft_length(match, k + 1) >= length
    if match >= k:
        assert length == k


def test_a_long_copy_drafts_k_tokens_and_a_fresh_match_few() -> None:
    text = list(range(100, 140))
    long_copy = text + text[:20]  # copying for 20 tokens: the next 8 drafted
    assert draft(long_copy, Speculation("ngram", 8), 64) == tuple(text[20:28])
    fresh = text + text[:2]  # a 2-token match: FLOOR drafted
    assert draft(fresh, Speculation("ngram", 8), 64) == tuple(text[2 : 2 + FLOOR])
    # a 1-token match drafts only where 1-token lookups held lately
    assert draft([*text, 100], Speculation("ngram", 8), 64) == ()  # a first repeat
    loop = [7, 8, 9] * 6
    assert single_hits(loop) >= SINGLE_HITS
    assert draft([*loop, 1, 7], Speculation("ngram", 8), 64)[:2] == (8, 9)
    # the longest match decides between two earlier places of the last 2 tokens
    older = [1, 2, 3, 4, 9, 9, 7, 3, 4, 5, 9, 9, 1, 2, 3, 4]
    assert ngram_draft(older, 2) == (9, 9)  # [1 2 3 4] was followed by 9 9, not [3 4] by 5


def test_greedy_confirms_the_longest_agreeing_prefix_and_one_more() -> None:
    logits = torch.full((4, 6), -1.0)
    for row, best in enumerate([2, 5, 1, 4]):
        logits[row, best] = 1.0
    g = torch.Generator().manual_seed(0)
    assert confirm(logits, [2, 5, 1], SamplingParams(), g)[0] == [2, 5, 1, 4]  # all, and a bonus
    assert confirm(logits, [2, 3, 1], SamplingParams(), g)[0] == [2, 5]  # the model's own choice
    assert confirm(logits[:1], [], SamplingParams(), g)[0] == [2]
    assert kept_until_stop([2, 5, 1, 4], frozenset({5})) == [2, 5]


P0 = torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1])
P1 = torch.tensor([0.25, 0.05, 0.1, 0.2, 0.4])
DRAWS = 20_000
SLACK = 0.015  # over 4 standard deviations of a frequency estimated from DRAWS draws


@pytest.mark.parametrize("drafted", [(1, 4), (0, 1), (3, 0)])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(0.7, 3)])
def test_sampled_tokens_keep_the_target_distribution(
    drafted: tuple[int, int], params: SamplingParams
) -> None:
    """For a likely draft, an unlikely one, and under temperature and top-k: the first
    token is distributed as the model's first row says, and the second, when the first
    draft token was kept, as its second row says (fixed seed)."""
    logits = torch.stack([P0.log(), P1.log(), P0.log()])
    g = torch.Generator().manual_seed(1234)
    first = torch.zeros(5)
    second = torch.zeros(5)
    for _ in range(DRAWS):
        got = confirm(logits, drafted, params, g)[0]
        assert 1 <= len(got) <= 3
        first[got[0]] += 1
        if got[0] == drafted[0]:
            second[got[1]] += 1

    def target(p: torch.Tensor) -> torch.Tensor:
        from butterfly.runtime.sampling import distribution

        return distribution(p.log(), params)

    assert (first / DRAWS - target(P0)).abs().max() < SLACK
    kept = float(second.sum())
    assert abs(kept / DRAWS - float(target(P0)[drafted[0]])) < SLACK
    if float(target(P0)[drafted[0]]) == 0.0:  # cut by top-k: never kept
        assert kept == 0
        return
    assert (second / kept - target(P1)).abs().max() < SLACK * (DRAWS / kept) ** 0.5


Q0 = torch.tensor([0.3, 0.1, 0.4, 0.05, 0.15])
Q1 = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(0.7, 3)])
def test_tokens_drafted_from_a_distribution_keep_the_target_distribution(
    params: SamplingParams,
) -> None:
    """Draft tokens drawn from q (a draft model's) and judged with it: the first token is
    distributed as the model's first row says, whatever q was, and so is the second once
    the first draft token was kept; a draft whose q is p itself is always kept."""
    from butterfly.runtime.sampling import distribution

    logits = torch.stack([P0.log(), P1.log(), P0.log()])
    q = torch.stack([Q0, Q1])
    g = torch.Generator().manual_seed(99)
    first, second = torch.zeros(5), torch.zeros(5)
    for _ in range(DRAWS):
        drafted = [int(torch.multinomial(row, 1, generator=g)) for row in q]
        got = confirm(logits, drafted, params, g, q=q)[0]
        first[got[0]] += 1
        if got[0] == drafted[0] and len(got) > 1:
            second[got[1]] += 1
    assert (first / DRAWS - distribution(P0.log(), params)).abs().max() < SLACK
    kept = float(second.sum())
    assert (second / kept - distribution(P1.log(), params)).abs().max() < SLACK * (
        DRAWS / kept
    ) ** 0.5
    same = torch.stack([distribution(P0.log(), params), distribution(P1.log(), params)])
    for _ in range(200):
        drafted = [int(torch.multinomial(row, 1, generator=g)) for row in same]
        assert confirm(logits, drafted, params, g, q=same)[0][:2] == drafted


# the pipeline: prompts whose continuation repeats spans of it (an edit) and one that
# does not repeat by construction
EDIT = (
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "# the same, renamed:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
)


GREEDY = SamplingParams()


def splits(n: int) -> list[list[LayerRange]]:
    """Every single boundary, plus one stage per layer, plus the whole model."""
    two = [[LayerRange(0, k), LayerRange(k, n)] for k in range(1, n)]
    return [[LayerRange(0, n)], *two, [LayerRange(i, i + 1) for i in range(n)]]


async def generate(
    pipe: LocalPipeline,
    prompt: tuple[int, ...],
    new: int,
    name: str,
    spec: Speculation,
    *,
    chunk: int = 0,
    sampling: SamplingParams = GREEDY,
) -> InferenceResult:
    pipe.engine.retune_generation(speculation=spec, prefill_chunk=chunk)
    task = InferenceTask(RequestId(name), prompt, max_new_tokens=new, sampling=sampling)
    return await pipe.run(task, lambda token: None)


async def test_greedy_tokens_are_plain_decodings_at_every_split_in_fewer_traversals(
    tiny_model: Path,
) -> None:
    prompt = tuple(TextCodec.load(tiny_model).encode(EDIT))
    for ranges in splits(num_layers(tiny_model)):
        async with LocalPipeline(tiny_model, ranges) as pipe:
            plain = await generate(pipe, prompt, 40, "plain", Speculation("off"))
            for k in (1, 4, 7):
                spec = await generate(pipe, prompt, 40, f"spec{k}", Speculation("ngram", k))
                assert spec.output_ids == plain.output_ids, (ranges, k)
                assert spec.timings["traversals"] < plain.timings["traversals"], (ranges, k)
            assert plain.timings["traversals"] == len(plain.output_ids)
            # short budgets: the draft never runs past max_new_tokens
            for new in (1, 2, 3):
                short = await generate(pipe, prompt, new, f"short{new}", Speculation("ngram", 8))
                assert short.output_ids == plain.output_ids[:new]


async def test_a_stop_token_inside_a_confirmed_draft_ends_the_generation(
    tiny_model: Path,
) -> None:
    prompt = tuple(TextCodec.load(tiny_model).encode(EDIT))
    async with LocalPipeline(tiny_model, [LayerRange(0, num_layers(tiny_model))]) as pipe:
        plain = await generate(pipe, prompt, 30, "plain", Speculation("off"))
    stop = plain.output_ids[12]
    expected = plain.output_ids[: plain.output_ids.index(stop) + 1]
    n = num_layers(tiny_model)
    ranges = [LayerRange(0, 1), LayerRange(1, n)]
    async with LocalPipeline(tiny_model, ranges, stop_ids=frozenset({stop})) as pipe:
        spec = await generate(pipe, prompt, 30, "spec", Speculation("ngram", 6))
    assert spec.output_ids == expected


async def test_sampled_requests_are_reproducible_from_their_seed(tiny_model: Path) -> None:
    """The draws of the acceptance rule come from the request's generator: the same seed
    gives the same tokens (what a checkpoint's RNG state relies on)."""
    prompt = tuple(TextCodec.load(tiny_model).encode(EDIT))
    sampling = SamplingParams(temperature=0.8, seed=11)
    n = num_layers(tiny_model)
    async with LocalPipeline(tiny_model, [LayerRange(0, 1), LayerRange(1, n)]) as pipe:
        spec = Speculation("ngram", 4)
        a = await generate(pipe, prompt, 30, "a", spec, sampling=sampling)
        b = await generate(pipe, prompt, 30, "b", spec, sampling=sampling)
    assert a.output_ids == b.output_ids and len(a.output_ids) == 30


async def test_asking_for_logprobs_changes_no_token_and_each_is_its_own_rows(
    tiny_model: Path,
) -> None:
    """A request with logprobs drafts as one without does, each kept token scored from
    the verify step's row it was drawn from: undrafted when asked, a sampled request
    consumed its generator otherwise, and the same seed gave another text once
    `logprobs` was set (a review). Greedy, the scores are plain decoding's."""
    prompt = tuple(TextCodec.load(tiny_model).encode(EDIT))
    # sampled, the tiny model's text repeats (and drafts are found) only where biased to
    a, b = TextCodec.load(tiny_model).encode("ab")[-2:]
    bias = tuple(sorted({a: 8.0, b: 8.0}.items()))
    n = num_layers(tiny_model)
    spec = Speculation("ngram", 4)
    async with LocalPipeline(tiny_model, [LayerRange(0, 1), LayerRange(1, n)]) as pipe:
        for seed in (1, 2):
            sampled = SamplingParams(temperature=1.0, seed=seed, logit_bias=bias)
            plain = await generate(pipe, prompt, 30, f"p{seed}", spec, sampling=sampled)
            asked = replace(sampled, logprobs=2)
            scored = await generate(pipe, prompt, 30, f"s{seed}", spec, sampling=asked)
            assert scored.output_ids == plain.output_ids, seed
            assert scored.timings["traversals"] < len(scored.output_ids), seed  # it drafted
            assert [s.token for s in scored.logprobs] == list(scored.output_ids)
        greedy = replace(GREEDY, logprobs=2)
        one_by_one = await generate(pipe, prompt, 30, "g", Speculation("off"), sampling=greedy)
        drafted = await generate(pipe, prompt, 30, "d", spec, sampling=greedy)
    assert drafted.output_ids == one_by_one.output_ids
    assert drafted.timings["traversals"] < one_by_one.timings["traversals"]
    for a, b in zip(drafted.logprobs, one_by_one.logprobs, strict=True):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


async def test_a_chunked_prefill_gives_the_same_tokens_in_more_steps(tiny_model: Path) -> None:
    prompt = tuple(TextCodec.load(tiny_model).encode(EDIT))
    for ranges in splits(num_layers(tiny_model))[:2]:
        async with LocalPipeline(tiny_model, ranges) as pipe:
            whole = await generate(pipe, prompt, 12, "whole", Speculation("off"))
            chunked = await generate(pipe, prompt, 12, "chunked", Speculation("off"), chunk=16)
            both = await generate(pipe, prompt, 12, "both", Speculation("ngram", 4), chunk=16)
        assert chunked.output_ids == whole.output_ids == both.output_ids
        chunks = -(-len(prompt) // 16)
        assert chunked.timings["traversals"] == chunks + len(whole.output_ids) - 1
