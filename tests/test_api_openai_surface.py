"""The OpenAI fields beyond the basics: chat through the checkpoint's template, stop
strings, n > 1, logprobs, echo, penalties, usage in streams, fields accepted and
ignored, OpenAI's error shape and keep-alive comments."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from butterfly.api.gateway import Gateway
from butterfly.api.openai import CompletionChunks
from butterfly.api.openai_choices import StopScanner
from butterfly.api.openai_run import KEEPALIVE, Run, start, stream
from butterfly.api.openai_schema import IGNORED, ChatCompletionRequest, CompletionRequest
from butterfly.api.settings import ApiSettings
from butterfly.config.schema import ButterflyConfig
from butterfly.runtime.chat import ChatTemplate
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.scheduler import RECENT_S, Scheduler
from butterfly.schedule.state import TaskStatus
from butterfly.schedule.store import StoredTask, TaskStore
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.errors import InvalidRequest
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask, SamplingParams
from tests.api_util import SPLIT, assert_error, reference, serving

pytestmark = pytest.mark.anyio
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def events(text: str) -> list[Any]:
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def post(client: Any, path: str, **body: Any) -> Any:
    r = await client.post(path, json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r


def test_stop_scanner_holds_back_what_may_start_a_stop() -> None:
    s = StopScanner(["END", "##"])
    assert s.feed("abc E") == "abc "  # "E" may begin "END"
    assert s.feed("N") == ""
    assert s.feed("D tail") == "" and s.stopped
    s = StopScanner(["END"])
    assert s.feed("aE") == "a" and s.feed("x") == "Ex" and s.flush() == ""


def test_chat_template_renders_in_a_sandbox(tiny_model: Path) -> None:
    template = ChatTemplate.load(tiny_model)
    assert template is not None
    text = template.render(MESSAGES)
    assert text == "<|bos|>system: be brief\nuser: hi\nassistant:"
    with pytest.raises(InvalidRequest, match="roles are system, user and assistant"):
        template.render([{"role": "tool", "content": "x"}])  # the template's raise_exception
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequest):  # the sandbox refuses to reach Python internals
        escape.render(MESSAGES)


async def test_chat_completion_is_the_templated_prompt_completed(
    tiny_model: Path, tmp_path: Path
) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 4}
        answer = (await post(s.client, "/v1/chat/completions", **body)).json()
        assert s.codec.chat is not None
        ids = s.codec.tokenizer.encode(s.codec.chat.render(MESSAGES), add_special_tokens=False).ids
        expected = reference(tiny_model, list(ids), 12, SamplingParams(1.0, 0, 1.0, 4))
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"] == {
            "role": "assistant",
            "content": s.codec.decode(expected),
        }
        assert answer["usage"]["prompt_tokens"] == len(ids)  # no second BOS
        # streamed: a role chunk, the same text in pieces, a finish reason, usage, [DONE]
        r = await post(
            s.client,
            "/v1/chat/completions",
            stream=True,
            stream_options={"include_usage": True},
            **body,
        )
        chunks = events(r.text)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
        assert text == answer["choices"][0]["message"]["content"]
        assert chunks[-3]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
        assert chunks[-2]["choices"] == [] and chunks[-2]["usage"] == answer["usage"]
        assert chunks[-1] == "[DONE]"


async def test_chat_without_a_template_is_refused_clearly(tiny_model: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    async with serving(bare, tmp_path / "t.db") as s:
        r = await s.client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES}
        )
        assert_error(r, 400, "invalid_request", "no chat template", "/v1/completions")


async def test_stop_ends_generation_whole_and_streamed(tiny_model: Path, tmp_path: Path) -> None:
    """The text is cut before the stop string, and generation itself ended at the token
    that completed it: the task finished (not cancelled) with that many tokens, after as
    many traversals of the chain, and usage counts them, not max_tokens."""
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = {"prompt": "Once upon", "max_tokens": 30, "temperature": 1.0, "seed": 3}
        full = (await post(s.client, "/v1/completions", **body)).json()["choices"][0]["text"]
        at = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2])
        stop = full[at : at + 2]
        cut = full[: full.index(stop)]
        tokens = reference(tiny_model, s.codec.encode("Once upon"), 30, SamplingParams(1.0, seed=3))
        needed = next(n for n in range(1, 31) if stop in s.codec.decode(tokens[:n]))
        assert needed < 30  # the stop string comes before max_tokens

        async def ended_at_the_stop(answer_id: str) -> None:
            task_id = answer_id.removeprefix("cmpl-")
            snap = await s.scheduler.snapshot(task_id)
            assert snap.state.status is TaskStatus.COMPLETED and snap.result is not None
            assert list(snap.result.output_ids) == tokens[:needed]
            assert snap.result.timings["traversals"] == needed  # no step past the stop
            # what a client recovering a broken stream reads: the same text, cut
            assert (await s.client.get(f"/result/{task_id}")).json()["text"] == cut

        whole = (await post(s.client, "/v1/completions", stop=[stop, "never"], **body)).json()
        assert whole["choices"][0]["text"] == cut
        assert whole["choices"][0]["finish_reason"] == "stop"
        assert whole["usage"]["completion_tokens"] == needed
        await ended_at_the_stop(whole["id"])
        r = await post(
            s.client,
            "/v1/completions",
            stop=stop,
            stream=True,
            stream_options={"include_usage": True},
            **body,
        )
        chunks = events(r.text)[:-1]
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert "".join(texts) == cut  # never past the stop
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] == needed
        await ended_at_the_stop(chunks[0]["id"])


async def test_a_chat_results_text_read_by_id_is_cut_at_the_stop(
    tiny_model: Path, tmp_path: Path
) -> None:
    """README: after a broken stream, `GET /result/<id>` gives the whole text; it gave
    the decoding of every token, the stop string (and what its token spelled past it)
    back in, so a recovered answer differed from the unbroken stream's."""
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = {"messages": MESSAGES, "max_tokens": 40, "seed": 3}
        answer = (await post(s.client, "/v1/chat/completions", **body)).json()
        full = answer["choices"][0]["message"]["content"]
        stop = next(c for i, c in enumerate(full) if i and c != "\ufffd" and c not in full[:i])
        r = await post(s.client, "/v1/chat/completions", stop=stop, stream=True, **body)
        chunks = events(r.text)[:-1]
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert streamed == full[: full.index(stop)]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        task_id = chunks[0]["id"].removeprefix("chatcmpl-")
        assert (await s.client.get(f"/result/{task_id}")).json()["text"] == streamed


async def test_n_choices_sample_with_successive_seeds(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = {"prompt": "Once upon", "max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 3}
        answer = (await post(s.client, "/v1/completions", **body)).json()
        ids = s.codec.encode("Once upon")
        texts = [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
        for i, text in enumerate(texts):
            expected = reference(tiny_model, ids, 10, SamplingParams(1.0, 0, 1.0, 7 + i))
            assert text == s.codec.decode(expected)
        assert len(set(texts)) == 3
        r = await post(s.client, "/v1/completions", stream=True, **body)
        streamed = ["", "", ""]
        for c in events(r.text)[:-1]:
            for choice in c["choices"]:
                streamed[choice["index"]] += choice["text"]
        assert streamed == texts


async def test_a_batch_of_prompts_answers_n_choices_per_prompt(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`prompt` as a list of texts (what LangChain's completion model sends on every
    call) or of token-id lists: prompt i's choices at i*n.., each as the prompt alone."""
    async with serving(tiny_model, tmp_path / "t.db") as s:
        texts = ["Once upon", "The end"]
        alone = []
        for text in texts:
            body = {"prompt": text, "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2}
            answer = (await post(s.client, "/v1/completions", **body)).json()
            alone += [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
        ids = [s.codec.encode(t) for t in texts]
        base = {"max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2}
        for prompt in (texts, ids):
            answer = (await post(s.client, "/v1/completions", prompt=prompt, **base)).json()
            assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
            assert [c["text"] for c in answer["choices"]] == alone
            assert answer["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
            assert answer["usage"]["completion_tokens"] == 4 * 6
        r = await post(s.client, "/v1/completions", prompt=texts, stream=True, echo=True, **base)
        streamed = ["", "", "", ""]
        for c in events(r.text)[:-1]:
            for choice in c["choices"]:
                streamed[choice["index"]] += choice["text"]
        assert streamed == [texts[i // 2] + alone[i] for i in range(4)]
        r = await s.client.post(
            "/v1/completions", json={"model": "tiny", "prompt": ["a"] * 5, "n": 16}
        )
        assert_error(r, 400, "invalid_request", "80 completions")


async def test_penalties_change_greedy_output_as_the_reference_does(
    tiny_model: Path, tmp_path: Path
) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        ids = s.codec.encode("aaaa")
        outputs = []
        for presence, frequency in ((0.0, 0.0), (0.0, 2.0), (2.0, 0.0)):
            body = {"prompt": "aaaa", "max_tokens": 20, "temperature": 0.0}
            body |= {"presence_penalty": presence, "frequency_penalty": frequency}
            text = (await post(s.client, "/v1/completions", **body)).json()["choices"][0]["text"]
            params = SamplingParams(0.0, presence_penalty=presence, frequency_penalty=frequency)
            assert text == s.codec.decode(reference(tiny_model, ids, 20, params))
            outputs.append(text)
        assert outputs[0] != outputs[1] and outputs[0] != outputs[2]  # a penalty acts


async def test_logprobs_and_echo(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = {"prompt": "Once", "max_tokens": 6, "temperature": 0.0, "logprobs": 3}
        answer = (await post(s.client, "/v1/completions", **body)).json()
        logprobs = answer["choices"][0]["logprobs"]
        assert len(logprobs["token_logprobs"]) == answer["usage"]["completion_tokens"] == 6
        for value, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
            assert value <= 0 and 1 <= len(top) <= 3
            # greedy picks the likeliest (byte tokens that print alike share a dict key)
            assert value >= max(top.values()) - 1e-6
        echoed = (await post(s.client, "/v1/completions", echo=True, **body)).json()
        choice = echoed["choices"][0]
        assert choice["text"] == "Once" + answer["choices"][0]["text"]
        prompt = len(s.codec.encode("Once"))
        assert choice["logprobs"]["token_logprobs"][0] is None  # nothing precedes it
        assert None not in choice["logprobs"]["token_logprobs"][1:]
        after = choice["logprobs"]["token_logprobs"][prompt:]
        assert after == pytest.approx(logprobs["token_logprobs"], abs=1e-5)  # the same tokens
        # each offset points into the returned text, which leaves the BOS token out
        offsets, named = choice["logprobs"]["text_offset"], choice["logprobs"]["tokens"]
        assert offsets[:3] == [0, 0, 1] and named[1:3] == ["O", "n"]
        for start, end, token in zip(offsets, [*offsets[1:], None], named, strict=True):
            if not token.startswith("bytes:"):  # part of a character: where it starts
                assert choice["text"][start:end] in (token, "")
        chat = await post(
            s.client,
            "/v1/chat/completions",
            messages=MESSAGES,
            max_tokens=5,
            temperature=0.0,
            logprobs=True,
            top_logprobs=2,
        )
        content = chat.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == 5 and all(len(c["top_logprobs"]) == 2 for c in content)
        for c in content:  # greedy: the chosen token is the likeliest
            assert c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"])
        for c in content:  # a special token adds nothing to the content: no bytes
            special = c["token"].startswith("<|") and c["token"].endswith("|>")
            assert c["bytes"] == ([] if special else list(c["token"].encode()))
        # alternatives asked for without logprobs would silently be none: refused
        r = await s.client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "top_logprobs": 2},
        )
        assert_error(r, 400, "invalid_request", "top_logprobs needs logprobs")


ECHO_TOLERANCE = 1e-4
"""Prompt logprobs against transformers' in float32: the split stages and transformers
sum in other orders, which moves a log-probability by about 1e-6 here."""


@pytest.mark.parametrize("k", [0, 1])
async def test_each_token_is_in_its_own_top_logprobs(
    tiny_model: Path, tmp_path: Path, k: int
) -> None:
    """OpenAI "will always return the logprob of the sampled token, so there may be up to
    logprobs+1 elements" (vLLM too): clients read `top_logprobs[i][tokens[i]]`, which
    raised KeyError for every token with `logprobs: 0` and for any sampled or echoed
    token outside the k likeliest."""
    body = {"prompt": "Once", "max_tokens": 16, "seed": 5, "logprobs": k, "echo": True}
    async with serving(tiny_model, tmp_path / "t.db") as s:
        lp = (await post(s.client, "/v1/completions", **body)).json()["choices"][0]["logprobs"]
    rows = list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True))
    assert rows[0][2] is None  # the first prompt token: nothing scored it
    for token, value, top in rows[1:]:
        assert top[token] == value and len(top) <= k + 1, (token, value, top)


async def test_echo_logprobs_score_the_prompt_as_transformers_does(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Echo with logprobs: each prompt token after the first has its logprob given the
    tokens before it, and the k likeliest there, as log_softmax of transformers' logits
    says; the first has none (as in OpenAI and vLLM)."""
    prompt = "Once upon a time there"
    async with serving(tiny_model, tmp_path / "t.db") as s:
        ids = s.codec.encode(prompt)
        body = {"prompt": prompt, "max_tokens": 3, "temperature": 0.0, "logprobs": 3}
        answer = (await post(s.client, "/v1/completions", echo=True, **body)).json()
    logprobs = answer["choices"][0]["logprobs"]
    hf = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        reference_lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    rows = reference_lp[:-1]  # position p scores token p + 1
    expected = rows.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    got = logprobs["token_logprobs"][: len(ids)]
    assert got[0] is None and logprobs["top_logprobs"][0] is None
    assert got[1:] == pytest.approx(expected, abs=ECHO_TOLERANCE)
    for row, top, token in zip(rows, logprobs["top_logprobs"][1 : len(ids)], ids[1:], strict=True):
        best = [*torch.topk(row, 3).values.tolist(), float(row[token])]  # and its own
        assert 1 <= len(top) <= 4
        for value in top.values():
            assert min(abs(value - b) for b in best) <= ECHO_TOLERANCE
    assert len(logprobs["tokens"]) == len(ids) + answer["usage"]["completion_tokens"]


@pytest.mark.parametrize("held", [False, True])
async def test_a_streamed_echo_opens_with_the_prompt_and_its_logprobs(
    tiny_model: Path, tmp_path: Path, held: bool
) -> None:
    """The stream's first chunk is the echoed prompt with its tokens' logprobs (sent once
    they are scored, before any generated token; `api.stream_verified_only`: with the
    checked result), the same as the whole answer's."""
    prompt = "Once upon a time"
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0.0, "logprobs": 2, "echo": True}
    settings = ApiSettings(max_request_bytes=64 * 1024, stream_verified_only=held)
    async with serving(tiny_model, tmp_path / "t.db", settings=settings) as s:
        whole = (await post(s.client, "/v1/completions", **body)).json()["choices"][0]
        r = await post(s.client, "/v1/completions", stream=True, **body)
    chunks = events(r.text)[:-1]
    first = chunks[0]["choices"][0]
    ids = s.codec.encode(prompt)
    assert first["text"] == prompt
    values = first["logprobs"]["token_logprobs"]
    assert len(values) == len(ids) and values[0] is None
    assert values[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1 : len(ids)])
    assert first["logprobs"]["top_logprobs"][1:] == whole["logprobs"]["top_logprobs"][1 : len(ids)]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


async def test_echo_with_max_tokens_0_scores_the_prompt_only(
    tiny_model: Path, tmp_path: Path
) -> None:
    """What evaluation harnesses send (echo, logprobs, max_tokens 0): the prompt and its
    logprobs, the same as with a generated token after them, and no new token; without
    echo, max_tokens 0 is refused."""
    prompt = "Once upon a time"
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = {"prompt": prompt, "temperature": 0.0, "logprobs": 2, "echo": True}
        scored = (await post(s.client, "/v1/completions", max_tokens=0, **body)).json()
        longer = (await post(s.client, "/v1/completions", max_tokens=1, **body)).json()
        plain = (
            await post(s.client, "/v1/completions", max_tokens=0, prompt=prompt, echo=True)
        ).json()
        r = await s.client.post(
            "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 0}
        )
        assert_error(r, 400, "invalid_request", "max_tokens 0", "echo")
    ids = s.codec.encode(prompt)
    choice = scored["choices"][0]
    assert choice["text"] == prompt and scored["usage"]["completion_tokens"] == 0
    values = choice["logprobs"]["token_logprobs"]
    assert len(values) == len(ids) and values[0] is None and None not in values[1:]
    reference_values = longer["choices"][0]["logprobs"]["token_logprobs"][: len(ids)]
    assert values[1:] == pytest.approx(reference_values[1:], abs=1e-5)
    assert plain["choices"][0]["text"] == prompt  # echo alone: nothing to compute


async def test_fields_sdks_send_are_accepted_and_ignored(tiny_model: Path, tmp_path: Path) -> None:
    sent: dict[str, Any] = {
        "user": "u-1",
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "auto",
        "response_format": {"type": "text"},
        "parallel_tool_calls": True,
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
    }
    assert set(sent) - {"user"} <= set(IGNORED)
    async with serving(tiny_model, tmp_path / "t.db") as s:
        base = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0.0}
        plain = (await post(s.client, "/v1/chat/completions", **base)).json()
        extra = (await post(s.client, "/v1/chat/completions", **base, **sent)).json()
        assert plain["choices"] == extra["choices"]
        r = await s.client.post(
            "/v1/chat/completions", json={"model": "tiny", **base, "max_tokenz": 3}
        )
        assert_error(r, 400, "invalid_request", "max_tokenz")
        assert r.json()["error"]["param"] == "max_tokenz"  # OpenAI's `param`
        r = await s.client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": 3}
        )
        assert r.json()["error"]["param"] == "temperature"
        image = {"type": "image_url", "image_url": {"url": "data:,"}}
        parts = [{"role": "user", "content": [{"type": "text", "text": "what is"}, image]}]
        r = await s.client.post("/v1/chat/completions", json={"model": "tiny", "messages": parts})
        assert_error(r, 400, "invalid_request", "text only", "image_url")
        parts[0]["content"] = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
        r = await s.client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": parts, "max_tokens": 2, "temperature": 0},
        )
        assert r.status_code == 200, r.text


def test_the_readme_lists_exactly_the_fields_accepted_and_ignored() -> None:
    """README's "Accepted and ignored" list is what the request schemas take and drop:
    a field added to IGNORED without the README, or listed there but refused, fails."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("**Accepted and ignored**")
    listed = readme[start : readme.index("Butterfly\n  has no tool calling", start)]
    names = set(re.findall(r"`([a-z_.]+)`", listed.split(", each on the route")[0]))
    assert names == {*IGNORED, "user", "stream_options.include_obfuscation"}
    fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert names - {"stream_options.include_obfuscation"} <= fields


async def test_a_negative_seed_and_stream_obfuscation_are_taken(
    tiny_model: Path, tmp_path: Path
) -> None:
    """OpenAI's seed is any 64-bit integer (its spec, and vLLM, take negative ones):
    folded into the sampler's 0..2^63-1, so it is reproducible; `include_obfuscation`
    (newer OpenAI SDKs) is accepted and ignored."""
    async with serving(tiny_model, tmp_path / "t.db") as s:
        base = {"prompt": "Once", "max_tokens": 8, "temperature": 1.0}
        negative = (await post(s.client, "/v1/completions", seed=-1, **base)).json()
        folded = (await post(s.client, "/v1/completions", seed=(1 << 63) - 1, **base)).json()
        assert negative["choices"][0]["text"] == folded["choices"][0]["text"]
        r = await s.client.post(
            "/v1/completions", json={"model": "tiny", **base, "seed": -(1 << 64)}
        )
        assert_error(r, 400, "invalid_request", "seed")
        options = {"include_usage": True, "include_obfuscation": False}
        r = await post(
            s.client, "/v1/completions", stream=True, stream_options=options, seed=-1, **base
        )
        assert events(r.text)[-2]["usage"] == negative["usage"]


async def test_a_quiet_stream_sends_keepalive_comments(tiny_model: Path, tmp_path: Path) -> None:
    """A scheduler that never dispatches: the stream has no token to send, and says so
    with a comment every interval instead of going silent."""
    async with serving(tiny_model, tmp_path / "t.db", run=False) as s:
        gw = s.app.state.gateway
        body = CompletionRequest(model="tiny", prompt="Once", max_tokens=5)
        codec: TextCodec = s.codec
        run: Run = await start(gw, codec, [codec.encode("Once")], 5, SamplingParams(), 1, ())
        messages = stream(run, CompletionChunks(gw, 0, body), False, keepalive_s=0.01)
        first = [await anext(messages) for _ in range(3)]
        await messages.aclose()
        assert first == [KEEPALIVE] * 3


class UnreadableStore(TaskStore):
    """A faulty part: the gateway's disk fails every read once `broken` is set (SQLite's
    "disk I/O error")."""

    broken = False

    def get(self, task_id: str) -> StoredTask | None:
        if self.broken:
            raise sqlite3.OperationalError("disk I/O error")
        return super().get(task_id)


async def test_a_stream_whose_token_feed_breaks_ends_with_an_error(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The scheduler's feed of a task raises (its result, out of memory, read from a
    disk that fails): the stream ends with an error in the contract's shape naming
    where the result is read, then `[DONE]`, instead of keep-alive comments forever
    (its pump died silently and the stream waited for it: a review)."""
    codec, now = TextCodec.load(tiny_model), [1000.0]
    store = UnreadableStore(tmp_path / "t.db")
    got: list[str] = []
    async with LocalPipeline(
        tiny_model, SPLIT, stop_ids=codec.eos_ids, tokenizer=codec.tokenizer
    ) as engine:
        sched = Scheduler(engine=engine, store=store, emit=lambda e: None, clock=lambda: now[0])
        gw = Gateway(sched, engine, codec, ApiSettings(), "tiny")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sched.run())
            ids = codec.encode("Once")
            run = await start(gw, codec, [ids], 3, SamplingParams(), 1, ())
            await sched.wait(run.tasks[0].task_id, 60)
            now[0] += RECENT_S + 1  # the next task to finish pushes this one out of memory
            other = await start(gw, codec, [ids], 3, SamplingParams(), 1, ())
            await sched.wait(other.tasks[0].task_id, 60)
            store.broken = True
            body = CompletionRequest(model="tiny", prompt="Once", max_tokens=3)
            messages = stream(run, CompletionChunks(gw, 0, body), False, keepalive_s=0.01)
            try:
                async with asyncio.timeout(30):
                    async for message in messages:
                        got.append(message)
                        if len(got) >= 20:  # bounded: unfixed, keep-alives never end
                            break
            finally:
                store.broken = False
                await messages.aclose()
                sched.shutdown()
    store.close()
    assert got[-1] == "data: [DONE]\n\n" and KEEPALIVE not in got, got[-3:]
    error = events("".join(got))[-2]["error"]
    task_id = run.tasks[0].task_id
    assert error["type"] == "internal_error", error
    assert "disk I/O error" in error["message"] and f"/result/{task_id}" in error["message"]


def test_served_name_is_checked_at_load() -> None:
    assert ButterflyConfig.model_validate({"model": {"served_name": "org/tiny-7b"}})
    with pytest.raises(ValidationError, match="served_name"):
        ButterflyConfig.model_validate({"model": {"served_name": "two words"}})


async def test_what_openai_clients_read_from_the_edges_of_a_request(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`client.models.retrieve`, a completion's `max_tokens: null` (16, OpenAI's
    default), the two combinations OpenAI refuses, and a full context told by its code
    (LangChain and LiteLLM read `context_length_exceeded`)."""
    async with serving(tiny_model, tmp_path / "t.db") as s:
        card = await s.client.get("/v1/models/tiny")
        assert card.status_code == 200 and card.json()["id"] == "tiny"
        missing = await s.client.get("/v1/models/other")
        assert_error(missing, 404, "model_not_found", "'other'")
        assert missing.json()["error"]["code"] == "model_not_found"
        body = {"prompt": "Once", "temperature": 0.0, "stop": None}
        null = (await post(s.client, "/v1/completions", max_tokens=None, **body)).json()
        given = (await post(s.client, "/v1/completions", max_tokens=16, **body)).json()
        assert null["choices"][0]["text"] == given["choices"][0]["text"]
        assert null["usage"]["completion_tokens"] == given["usage"]["completion_tokens"]
        for extra, words in (
            ({"best_of": 2, "n": 3}, "best_of (2) must be at least n (3)"),
            ({"stream_options": {"include_usage": True}}, "only allowed when stream is true"),
        ):
            r = await s.client.post("/v1/completions", json={"model": "tiny", **body, **extra})
            assert_error(r, 400, "invalid_request", words)
        context = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
        long = list(range(3, 100)) * (context // 97 + 1)
        for path, field, request in (
            ("/v1/completions", "prompt", {"prompt": long}),
            ("/v1/completions", "prompt", {"prompt": [1, 2, 3], "max_tokens": context}),
            ("/v1/chat/completions", "messages", {"messages": MESSAGES, "max_tokens": context}),
        ):
            r = await s.client.post(path, json={"model": "tiny", **request})
            assert_error(r, 400, "invalid_request", "context")
            error = r.json()["error"]
            assert (error["code"], error["param"]) == ("context_length_exceeded", field), error


async def test_a_prompt_filling_the_context_is_scored_or_continued_by_one(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A prompt of exactly `context` tokens needs `context` positions to score (echo,
    `max_tokens` 0, the full windows evaluation harnesses send) or to give one token;
    it was refused whatever `max_tokens` asked. One more token, or a second new one,
    is still beyond the context."""
    async with serving(tiny_model, tmp_path / "t.db") as s:
        context = s.scheduler._engine.max_context
        ids = [256] + [97 + i % 26 for i in range(context - 1)]  # <|bos|> a b c ...
        body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}
        scored = (await post(s.client, "/v1/completions", **body)).json()["choices"][0]
        assert len(scored["logprobs"]["tokens"]) == context
        one = {"prompt": ids, "max_tokens": 1, "temperature": 0.0}
        answer = (await post(s.client, "/v1/completions", **one)).json()
        assert answer["usage"] == {
            "prompt_tokens": context,
            "completion_tokens": 1,
            "total_tokens": context + 1,
        }
        for request in ({**body, "prompt": [*ids, 97]}, {**one, "max_tokens": 2}):
            r = await s.client.post("/v1/completions", json={"model": "tiny", **request})
            assert_error(r, 400, "invalid_request", "context")
            assert r.json()["error"]["code"] == "context_length_exceeded"


async def test_logprobs_of_bytes_inside_a_character(tiny_model: Path, tmp_path: Path) -> None:
    """A byte-level token holding part of a character is named `bytes:\\xNN` as OpenAI
    names it (all such tokens read as U+FFFD before, so top_logprobs kept one of them and
    the greedy token's own value could be lost), starts where its character does in
    `text_offset` (offsets drifted one character per byte after an "é"), keeps counting
    across a stream's chunks (each chunk restarted at 0), and on chat carries its own
    bytes (they were U+FFFD's three)."""
    body = {"prompt": "café €", "max_tokens": 8, "temperature": 0.0, "logprobs": 5, "echo": True}
    async with serving(tiny_model, tmp_path / "t.db") as s:
        whole = (await post(s.client, "/v1/completions", **body)).json()["choices"][0]
        streamed = await post(s.client, "/v1/completions", stream=True, **body)
        chat = await post(
            s.client,
            "/v1/chat/completions",
            messages=[{"role": "user", "content": "é€"}],
            max_tokens=12,
            temperature=0.0,
            logprobs=True,
            top_logprobs=3,
        )
    lp = whole["logprobs"]
    assert lp["tokens"][:7] == ["<|bos|>", "c", "a", "f", "bytes:\\xc3", "bytes:\\xa9", " "]
    assert lp["text_offset"][:10] == [0, 0, 1, 2, 3, 3, 4, 5, 5, 5]
    for at, token in zip(lp["text_offset"], lp["tokens"], strict=True):
        if not token.startswith(("bytes:", "<|")):
            assert whole["text"][at:].startswith(token)
    generated = slice(10, None)  # after the prompt's 10 tokens, greedy's own picks
    for value, top in zip(
        lp["token_logprobs"][generated], lp["top_logprobs"][generated], strict=True
    ):
        assert len(top) == 5 and max(top.values()) == pytest.approx(value)
    chunks = [c["choices"][0].get("logprobs") for c in events(streamed.text)[:-1]]
    assert [o for c in chunks if c for o in c["text_offset"]] == lp["text_offset"]
    content = chat.json()["choices"][0]["logprobs"]["content"]
    raw = b"".join(bytes(c["bytes"]) for c in content)
    assert raw.decode("utf-8", "replace").startswith(
        chat.json()["choices"][0]["message"]["content"]
    )


class SlowCancels:
    """A serving scheduler whose every cancel waits on the standbys' answer: how many
    of them wait at once."""

    serving = True

    def __init__(self) -> None:
        self.waiting = self.most = 0

    async def cancel(self, task_id: str) -> None:
        self.waiting += 1
        self.most = max(self.most, self.waiting)
        await asyncio.sleep(0.01)
        self.waiting -= 1


async def test_the_cancels_of_a_requests_choices_wait_on_the_standbys_together() -> None:
    """Each cancel waits until a standby holds its end (up to 5 s), and one after another
    the 64 choices of one request held it up to 320 s (a review)."""
    scheduler = SlowCancels()
    tasks = [InferenceTask(RequestId(f"c{i}"), (1,), max_new_tokens=1) for i in range(8)]
    run = Run(SimpleNamespace(scheduler=scheduler), tasks, [], [])  # type: ignore[arg-type]
    await run.cancel_unfinished(keep=(0,))
    assert scheduler.most == 7, f"{scheduler.most} of 7 cancels waited at once"
