"""The OpenAI-compatible endpoints: completions, streamed and not, and the model list."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from butterfly.runtime.detok import IncrementalText
from butterfly.runtime.tokenizer import TextCodec
from butterfly.types.tasks import SamplingParams
from tests.api_util import (
    Served,
    assert_error,
    body_then_hang_up,
    raw_scope,
    reference,
    serving,
    statuses_of_a_client_hanging_up,
    still_serves,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sse_events(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, `[DONE]` kept as the string."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def complete(s: Served, **body: Any) -> Any:
    r = await s.client.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r


async def test_models_lists_the_served_model(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = (await s.client.get("/v1/models")).json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["tiny"]


async def test_completion_matches_generate(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        r = await complete(s, prompt="Once upon", max_tokens=24, temperature=1.0, seed=5)
        body = r.json()
        ids = s.codec.encode("Once upon")
        expected = reference(tiny_model, ids, 24, SamplingParams(1.0, 0, 1.0, 5))
        assert body["object"] == "text_completion" and body["model"] == "tiny"
        assert body["choices"][0]["text"] == s.codec.decode(expected)
        finish = "stop" if expected[-1] in s.codec.eos_ids else "length"
        assert body["choices"][0]["finish_reason"] == finish
        assert body["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": len(expected),
            "total_tokens": len(ids) + len(expected),
        }
        r = await complete(s, prompt=ids, max_tokens=24, temperature=1.0, seed=5)
        assert r.json()["choices"][0]["text"] == body["choices"][0]["text"]


async def test_stream_yields_the_same_text_and_ends_with_done(
    tiny_model: Path, tmp_path: Path
) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        request = {"prompt": "Stream me", "max_tokens": 40, "temperature": 1.0, "seed": 123}
        plain = (await complete(s, **request)).json()["choices"][0]["text"]
        r = await complete(s, stream=True, **request)
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert len(chunks) > 2  # text arrives piece by piece
        assert all(c["object"] == "text_completion" for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in {"stop", "length"}
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert "".join(c["choices"][0]["text"] for c in chunks) == plain
        assert plain  # sampled bytes: a non-trivial text


async def test_bad_completion_requests(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs"),
            ({"model": "tiny", "prompt": "x", "n": 17}, "n"),
            ({"model": "tiny", "prompt": "x", "max_token": 3}, "max_token"),  # a typo
            ({"model": "tiny", "prompt": "x", "stop": ""}, "stop"),
            ({"model": "tiny", "prompt": ["a"] * 33}, "prompt"),  # a batch over 32
            ({"model": "tiny", "prompt": "x", "max_tokens": 4096}, "4096"),
            ({"prompt": "x"}, "model"),
        ]
        for body, word in cases:
            r = await s.client.post("/v1/completions", json=body)
            assert_error(r, 400, "invalid_request", word)
        # another model: 404 model_not_found, as OpenAI and vLLM answer it
        for path, body in (
            ("/v1/completions", {"prompt": "x"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ):
            r = await s.client.post(path, json={"model": "gpt-4", **body})
            assert_error(r, 404, "model_not_found", "gpt-4")
            assert r.json()["error"]["param"] == "model"
            assert r.json()["error"]["code"] == "model_not_found"
        await still_serves(s)


def test_incremental_text_never_splits_a_character(tiny_model: Path) -> None:
    codec = TextCodec.load(tiny_model)
    ids = codec.encode("héllo 🦋 wörld")[1:]  # byte tokens; the emoji is four of them
    text = IncrementalText(codec.tokenizer)
    deltas = [text.push(i) for i in ids]
    deltas.append(text.flush())
    assert "".join(deltas) == "héllo 🦋 wörld"
    assert all("\ufffd" not in d for d in deltas)


async def test_a_client_that_gives_up_on_a_whole_answer_cancels_its_tasks(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Not streamed: a client's timeout closes the connection while the choices run; they
    are cancelled as a stream's are (they ran to the end, and the official client's two
    retries each ran theirs beside them)."""
    async with serving(tiny_model, tmp_path / "t.db", max_concurrent=1) as s:
        request = {"model": "tiny", "prompt": "bye", "max_tokens": 500, "temperature": 0}
        statuses = await statuses_of_a_client_hanging_up(s, "/v1/completions", {**request, "n": 4})
        assert statuses == [499]
        text = (await s.client.get("/metrics")).text
        assert 'butterfly_tasks_total{status="cancelled"} 4.0' in text
        assert 'butterfly_tasks_total{status="completed"} 0.0' in text
        await still_serves(s)


async def test_a_whole_answer_ends_with_503_when_the_scheduler_stops_under_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The node hands the gateway role on (or ends a stop's grace) while a whole answer
    waits: its scheduler's `wait` then returns at once with the task unfinished. The
    answer is a 503 naming where to read the result, as a stream's is, not a loop on
    `wait` spinning the event loop until the client hangs up; and its tasks stay queued
    for the gateway that runs them next, not cancelled (a review)."""
    async with serving(tiny_model, tmp_path / "t.db", max_concurrent=1) as s:
        app = s.client._transport.app  # type: ignore[attr-defined]
        request = {"model": "tiny", "prompt": "bye", "max_tokens": 500, "temperature": 0}
        receive = body_then_hang_up(json.dumps({**request, "n": 2}), asyncio.Event())
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        waits = 0
        real_wait = s.scheduler.wait

        async def counted_wait(task_id: str, timeout: float) -> Any:
            nonlocal waits
            waits += 1
            return await real_wait(task_id, timeout)

        s.scheduler.wait = counted_wait  # type: ignore[method-assign]
        answer = asyncio.create_task(app(raw_scope("/v1/completions"), receive, send))
        try:
            for _ in range(2000):  # bounded: the first choice runs within seconds
                if s.scheduler.active:
                    break
                await asyncio.sleep(0.005)
            assert s.scheduler.active
            before = waits
            s.scheduler.shutdown()  # as the node does when the role moves on
            async with asyncio.timeout(20):  # unfixed, it spun until the client left
                await answer
        finally:
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        assert start["status"] == 503, body
        assert body["error"]["type"] == "service_unavailable"
        assert "/result/" in body["error"]["message"]
        # the one that returned, and any begun before the stop settled: no spinning
        assert waits - before <= 5, waits - before
        text = (await s.client.get("/metrics")).text
        assert 'butterfly_tasks_total{status="cancelled"} 0.0' in text
        task_id = body["error"]["message"].split("/result/")[1].split()[0]
        assert not (await s.scheduler.snapshot(task_id)).state.terminal


async def test_client_disconnect_cancels_the_streamed_task(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Raw ASGI, because the test client buffers whole responses: the client reads one
    chunk, then hangs up; the task must be cancelled rather than run its 400 tokens."""
    async with serving(tiny_model, tmp_path / "t.db", max_concurrent=1) as s:
        app = s.client._transport.app  # type: ignore[attr-defined]
        # greedy: it runs all 400 tokens (sampled, the tiny model often ends at once, and
        # then the task completed before the hang-up could cancel it)
        request = {"model": "tiny", "prompt": "bye", "max_tokens": 400, "temperature": 0}
        body = json.dumps({**request, "stream": True})
        first_chunk, hang_up = asyncio.Event(), asyncio.Event()
        statuses: list[int] = []
        receive = body_then_hang_up(body, hang_up)

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            elif message["type"] == "http.response.body" and message.get("body"):
                first_chunk.set()
                hang_up.set()

        async with asyncio.timeout(60):
            await app(raw_scope("/v1/completions"), receive, send)
        assert statuses == [200] and first_chunk.is_set()
        text = (await s.client.get("/metrics")).text  # cancelled before the app returned
        assert 'butterfly_tasks_total{status="cancelled"} 1.0' in text
        assert 'butterfly_tasks_total{status="completed"} 0.0' in text
        await still_serves(s)  # one slot (max_concurrent=1): it was freed
