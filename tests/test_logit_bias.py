"""OpenAI's `logit_bias`: each named token's logit moved by its value before every choice,
greedy and sampled, on both OpenAI routes; bad maps refused naming the field; kept by the
store; and held by the audit to the biased choice, so an honest cluster's biased answer
is verified and nobody is blamed for it.

The tiny model's tokenizer is byte-level (token `ord(c)` spells `c`), so a forced token's
text is known without the sampler that is under test."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from butterfly.dataplane.chosen import Chosen
from butterfly.protocol.proof import Tolerance
from butterfly.runtime.sampling import distribution, greedy_token, make_generator, sample
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.errors import InvalidInput
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask, SamplingParams
from tests.api_util import assert_error, reference, serving

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_a_bias_moves_the_choice_greedy_and_sampled() -> None:
    logits = torch.tensor([0.0, 3.0, 2.0, -1.0])
    assert greedy_token(logits, SamplingParams()) == 1
    banned = SamplingParams(logit_bias=((1, -100.0),))
    assert greedy_token(logits, banned) == 2  # the next best
    assert greedy_token(logits, SamplingParams(logit_bias=((3, 4.5),))) == 3  # 3.5 beats 3
    hot = SamplingParams(temperature=1.0, seed=7, logit_bias=((1, -100.0), (2, -100.0)))
    p = distribution(logits, hot)
    assert float(p[1] + p[2]) < 1e-40 and float(p[0]) > float(p[3]) > 0.0
    g = make_generator(hot)
    assert {sample(logits, hot, g) for _ in range(200)} == {0, 3}
    # penalties still count on top of the bias
    both = SamplingParams(presence_penalty=2.0, logit_bias=((2, 0.5),))
    assert greedy_token(logits, both, history=[1]) == 2  # 1: 3 - 2; 2: 2 + 0.5


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, float("inf"), float("nan")]), min_size=1),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_the_greedy_token_is_torch_argmax_ties_and_nan_included(
    values: list[float], dtype: torch.dtype
) -> None:
    """The greedy pick, taken by numpy, is the one torch.argmax makes: the first of equal
    largest logits, and the first NaN where there is one, for fp32 and bf16 logits."""
    logits = torch.tensor(values).to(dtype)
    want = int(torch.argmax(logits.float()).item())
    assert greedy_token(logits, SamplingParams()) == want


def test_a_bias_map_must_name_distinct_tokens_in_range() -> None:
    with pytest.raises(InvalidInput, match="distinct token ids"):
        SamplingParams(logit_bias=((3, 1.0), (3, 2.0)))
    with pytest.raises(InvalidInput, match="distinct token ids"):
        SamplingParams(logit_bias=((-1, 1.0),))
    with pytest.raises(InvalidInput, match="finite"):
        SamplingParams(logit_bias=((3, float("nan")),))
    with pytest.raises(InvalidInput, match="logit_bias names token 9; the model has 4"):
        greedy_token(torch.zeros(4), SamplingParams(logit_bias=((9, 1.0),)))


def test_the_audit_holds_a_biased_greedy_token_to_the_biased_logits() -> None:
    """Positions 1 and 2 of a prompt of 2; the raw best is token 1 at both."""
    tol = Tolerance(rtol=1e-3, atol=1e-4)
    logits = torch.tensor([[[0.0, 5.0, 1.0], [0.0, 5.0, 4.0]]])
    biased = SamplingParams(logit_bias=((1, -100.0),))
    assert Chosen(biased, 2, (2, 2)).wrong(logits, 1, tol) == []
    assert Chosen(biased, 2, (1, 2)).wrong(logits, 1, tol) == [1]  # the banned raw best
    assert Chosen(SamplingParams(), 2, (2, 2)).wrong(logits, 1, tol) == [1, 2]
    sampled = SamplingParams(temperature=1.0, seed=1, logit_bias=((0, 100.0),))
    assert Chosen(sampled, 2, (0, 0)).wrong(logits, 1, tol) == []
    assert Chosen(sampled, 2, (1, 0)).wrong(logits, 1, tol) == [1]  # e^-95: never drawn


async def _text(client: Any, path: str, **body: Any) -> str:
    r = await client.post(path, json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return str(choice["text"] if "text" in choice else choice["message"]["content"])


@pytest.mark.anyio
async def test_both_routes_ban_and_force_tokens(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        base = {"prompt": "Once", "max_tokens": 8, "temperature": 0.0, "logprobs": 2}
        r = await s.client.post("/v1/completions", json={"model": "tiny", **base})
        plain = r.json()["choices"][0]
        first = plain["logprobs"]["tokens"][0]
        second = next(t for t in plain["logprobs"]["top_logprobs"][0] if t != first)
        banned = {"logit_bias": {str(ord(first)): -100}}
        r = await s.client.post("/v1/completions", json={"model": "tiny", **base, **banned})
        again = r.json()["choices"][0]
        assert again["logprobs"]["tokens"][0] == second  # the raw runner-up
        # logprobs stay the model's own, before the bias (as vLLM reports them)
        assert again["logprobs"]["top_logprobs"][0] == plain["logprobs"]["top_logprobs"][0]
        ids = s.codec.encode("Once")
        params = SamplingParams(logit_bias=((ord(first), -100.0),))
        assert again["text"] == s.codec.decode(reference(tiny_model, ids, 8, params))
        forced = {"logit_bias": {str(ord("z")): 100, str(ord("q")): -5.5}}
        for path, body in (
            ("/v1/completions", {"prompt": "Once", "max_tokens": 6}),
            ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6}),
            ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 6}),
        ):
            for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 3}):
                assert await _text(s.client, path, **body, **sampling, **forced) == "z" * 6
        stream = await s.client.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "Once", "max_tokens": 5, "stream": True, **forced},
        )
        assert stream.status_code == 200 and stream.text.count('"text": "z"') == 5


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("bias", "words"),
    [
        ({"abc": 1}, ["logit_bias"]),
        ({"01": 1}, ["logit_bias"]),  # two spellings of one token
        ({"-3": 1}, ["logit_bias"]),
        ({"65": 100.5}, ["logit_bias", "100"]),
        ({"65": "1"}, ["logit_bias"]),
        ({str(i): 1 for i in range(301)}, ["logit_bias", "300"]),
        ({"65": 1, "99999": 2, "100000": 3}, ["token 99999", "vocabulary", "1 more"]),
    ],
)
async def test_a_bad_bias_map_is_a_400_naming_it(
    tiny_model: Path, tmp_path: Path, bias: dict[str, Any], words: list[str]
) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        for path, body in (
            ("/v1/completions", {"prompt": "hi"}),
            ("/v1/chat/completions", {"messages": MESSAGES}),
        ):
            r = await s.client.post(path, json={"model": "tiny", **body, "logit_bias": bias})
            assert_error(r, 400, "invalid_request", *words)
            assert r.json()["error"]["param"].startswith("logit_bias")


@pytest.mark.timeout(120)
@pytest.mark.anyio
async def test_an_honest_clusters_biased_answer_is_verified_blaming_nobody(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Four in-process nodes in audit mode: the gateway chose each token from biased
    logits, and the audit, re-running the last stage, must judge the choice by them too
    (judged by the raw logits, the honest last stage would be blamed for every token)."""
    ids = tuple(TextCodec.load(tiny_model).encode("Once upon a time"))
    plain = reference(tiny_model, list(ids), 8, SamplingParams())
    bias = tuple(sorted((t, -100.0) for t in set(plain)))  # every raw choice banned
    params = SamplingParams(logit_bias=bias)
    expected = reference(tiny_model, list(ids), 8, params)
    assert not set(expected) & set(plain)
    settings = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": "audit"}
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        await c.first_plan()
        for sampling in (params, SamplingParams(temperature=1.0, seed=5, logit_bias=bias)):
            name = RequestId(f"bias-{sampling.temperature}")
            task = InferenceTask(name, input_ids=ids, max_new_tokens=8, sampling=sampling)
            result = await c.infer(task)
            assert result.verified == "audit", result.timings
            assert not set(result.output_ids) & set(plain)
            if sampling is params:
                assert list(result.output_ids) == expected
        for _ in range(20):  # time for a wrongful eviction to show, were one under way
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        assert all(not node.plans.evicted for node in c.nodes)


@pytest.mark.anyio
async def test_an_id_the_tokenizer_knows_beyond_the_models_vocabulary_is_refused(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A tokenizer with a token added past the model's `vocab_size` (a pad token added
    without resizing the embeddings): biasing it, or prompting with it, failed the task at
    its first step (a review); now a 400 naming the field."""
    wide = tmp_path / "wide"
    shutil.copytree(tiny_model, wide)
    tokenizer = Tokenizer.from_file(str(wide / "tokenizer.json"))
    tokenizer.add_special_tokens(["<|unsized|>"])
    tokenizer.save(str(wide / "tokenizer.json"))
    width = json.loads((wide / "config.json").read_text())["vocab_size"]
    assert tokenizer.get_vocab_size(with_added_tokens=True) == width + 1
    async with serving(wide, tmp_path / "t.db") as s:
        assert s.codec.vocab == width
        r = await s.client.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "hi", "logit_bias": {str(width): 1}, "stream": True},
        )
        assert_error(r, 400, "invalid_request", f"token {width}", f"vocabulary of {width}")
        assert r.json()["error"]["param"] == "logit_bias"
        r = await s.client.post("/inference", json={"input_ids": [5, width], "wait": True})
        assert_error(r, 400, "invalid_request", f"[0, {width})")
        r = await s.client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert r.status_code == 200
