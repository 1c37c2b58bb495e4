"""The official `openai` package against a served cluster: what an application written
for OpenAI sees. Two nodes in this process (in-memory transport between them), the
acting gateway's API served by uvicorn on a loopback port, as `butterfly cluster up`
serves it; the client speaks real HTTP to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import openai
import pytest

from butterfly.cli.launcher import free_port_block
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster

pytestmark = pytest.mark.anyio
T = TypeVar("T")
NAME = "acme/tiny-chat"  # model.served_name


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def served(tiny_model: Path, tmp_path: Path) -> AsyncIterator[tuple[InProcessCluster, str]]:
    port = free_port_block(2)
    settings = {"api.port": port, "model.served_name": NAME}
    async with InProcessCluster(tiny_model, 2, tmp_path, f=0, settings=settings) as c:
        await c.first_plan()
        gateway = c.gateway.gateway
        await c.until(lambda: gateway is not None and gateway.scheduler is not None, "the API")
        yield c, f"http://127.0.0.1:{port}/v1"


async def call(c: InProcessCluster, work: Awaitable[T]) -> T:
    """Run a client call while the cluster's heartbeats keep ticking."""
    task = asyncio.ensure_future(work)
    await c.until(task.done, "the client call", beats=3000)
    return task.result()


async def test_the_official_client_drives_every_route(tiny_model: Path, tmp_path: Path) -> None:
    async with served(tiny_model, tmp_path) as (c, url):
        await drive(c, url, tiny_model)


async def drive(c: InProcessCluster, url: str, tiny_model: Path) -> None:
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    codec = TextCodec.load(tiny_model)

    models = await call(c, client.models.list())
    assert [m.id for m in models.data] == [NAME]  # model.served_name, not the directory

    done = await call(
        c,
        client.completions.create(
            model=NAME, prompt="Once upon", max_tokens=12, seed=3, logprobs=2
        ),
    )
    choice = done.choices[0]
    assert done.model == NAME and done.usage is not None
    assert done.usage.prompt_tokens == len(codec.encode("Once upon"))
    assert done.usage.completion_tokens == len(choice.logprobs.token_logprobs)  # type: ignore[union-attr]
    tops = zip(choice.logprobs.tokens, choice.logprobs.top_logprobs, strict=True)  # type: ignore[union-attr, arg-type]
    assert all(t in top and len(top) <= 3 for t, top in tops)  # the k, and the token's own

    # stop: the same request cut before a piece of its own text
    text = choice.text
    stop = next(
        (text[i : i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2]), None
    )
    assert stop is not None, text  # seed 3 gives clean text past its second character
    if stop:
        cut = await call(
            c,
            client.completions.create(
                model=NAME, prompt="Once upon", max_tokens=12, seed=3, stop=[stop]
            ),
        )
        assert cut.choices[0].text == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"

    # streaming with usage: the chunks add up to the unstreamed text
    stream = await call(
        c,
        client.completions.create(
            model=NAME,
            prompt="Once upon",
            max_tokens=12,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        ),
    )

    async def collect() -> tuple[str, int]:
        pieces, usage = [], 0
        async for chunk in stream:
            pieces += [ch.text for ch in chunk.choices]
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return "".join(pieces), usage

    streamed, usage = await call(c, collect())
    assert streamed == text and usage == done.usage.completion_tokens

    # chat, whole and streamed, through the demo model's chat template
    messages = [{"role": "user", "content": "hello"}]
    chat = await call(
        c,
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=10,
            seed=9,
            logprobs=True,
            top_logprobs=1,  # type: ignore[arg-type]
        ),
    )
    answer = chat.choices[0]
    assert chat.model == NAME and answer.message.role == "assistant"
    assert answer.logprobs is not None and answer.logprobs.content
    assert chat.usage is not None and chat.usage.completion_tokens == len(answer.logprobs.content)
    rendered = codec.chat.render(messages) if codec.chat else ""
    assert chat.usage.prompt_tokens == len(
        codec.tokenizer.encode(rendered, add_special_tokens=False).ids
    )

    chunks = await call(
        c,
        client.chat.completions.create(
            model=NAME,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=10,
            seed=9,
            stream=True,
            stream_options={"include_usage": True},
        ),
    )

    async def collect_chat() -> tuple[str, list[str | None]]:
        pieces, finishes = [], []
        async for chunk in chunks:
            for ch in chunk.choices:
                pieces.append(ch.delta.content or "")
                finishes.append(ch.finish_reason)
        return "".join(pieces), finishes

    chat_text, finishes = await call(c, collect_chat())
    assert chat_text == answer.message.content
    assert finishes[-1] == answer.finish_reason

    # an error reaches the client as OpenAI's typed exception
    with pytest.raises(openai.NotFoundError) as caught:  # 404, as OpenAI answers it
        await call(c, client.completions.create(model="gpt-4", prompt="x"))
    assert "gpt-4" in str(caught.value) and caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await call(c, client.completions.create(model=NAME, prompt="x", temperature=3))
    assert bad.value.param == "temperature"
    await client.close()
