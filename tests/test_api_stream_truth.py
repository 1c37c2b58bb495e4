"""Streams tell the truth (issue 12, item 8): tokens streamed before a check that then
fails are withdrawn by a `retract` chunk before their replacements, or, with
`api.stream_verified_only`, no text leaves before the result has passed its check.

First with a composed engine whose run streams wrong tokens and withdraws them (as the
pipeline engine does when the audit catches a liar), then end to end: four in-process
nodes in audit mode, node 1 (the chain's last stage) corrupting what it sends."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from butterfly.api.app import create_app
from butterfly.api.settings import ApiSettings
from butterfly.metrics.prometheus import Metrics
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.engine import Retraction, TokenSink
from butterfly.schedule.scheduler import Scheduler
from butterfly.schedule.store import TaskStore
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import CorruptStageServer
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.ids import NodeId
from butterfly.types.tasks import InferenceResult, InferenceTask
from tests.api_util import serving

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
PROMPT, NEW = "Once upon a time", 16
WRONG = [ord(c) for c in "WRONG"]  # byte tokens of the tiny model


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> str:
    codec = TextCodec.load(tiny_model)
    ids = generate([load_stage(tiny_model)], codec.encode(PROMPT), NEW, stop_ids=codec.eos_ids)
    return codec.decode(list(ids))


class RetractingPipeline(LocalPipeline):
    """Streams "WRONG", withdraws it, then runs the task for real."""

    async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        for token in WRONG:
            on_token(token)
        await asyncio.sleep(0)
        on_token(Retraction("the audit caught node(s) 1 lying; computing again"))
        return await super().run(task, on_token)


def events(body: str) -> list[Any]:
    """An SSE body's events in order: JSON chunks, "[DONE]", and comments as str."""
    out: list[Any] = []
    for block in filter(None, body.split("\n\n")):
        if block.startswith(":"):
            out.append(block)
        else:
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def kept_text(chunks: list[Any]) -> str:
    """The text a client holds at the end, following the documented rule: a chunk with
    `retract` discards everything received before it."""
    text = ""
    for c in chunks:
        if isinstance(c, dict):
            text = "" if "retract" in c else text + c["choices"][0]["text"]
    return text


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["text"] for c in chunks if isinstance(c, dict))


BODY = {"model": "tiny", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0.0}


async def test_a_re_run_withdraws_what_was_streamed(
    tiny_model: Path, tmp_path: Path, expected: str
) -> None:
    async with serving(tiny_model, tmp_path / "t.db", engine_type=RetractingPipeline) as s:
        r = await s.client.post("/v1/completions", json={**BODY, "stream": True})
        chunks = events(r.text)
        retracts = [i for i, c in enumerate(chunks) if isinstance(c, dict) and "retract" in c]
        assert len(retracts) == 1
        withdrawn = chunks[retracts[0]]
        assert streamed_text(chunks[: retracts[0]]) == "WRONG"  # what was sent, then taken back
        assert withdrawn["retract"] == {
            "object": "butterfly.retraction",
            "reason": "the audit caught node(s) 1 lying; computing again",
        }
        assert withdrawn["object"] == "text_completion"  # a client that ignores it appends ""
        assert withdrawn["choices"][0] == {
            "text": "",
            "index": 0,
            "logprobs": None,
            "finish_reason": None,
        }
        assert kept_text(chunks) == expected
        assert chunks[-1] == "[DONE]" and chunks[-2]["choices"][0]["finish_reason"] is not None
        assert chunks[-2]["verified"] == "none"  # this engine checks nothing


async def test_a_held_stream_sends_only_checked_text(
    tiny_model: Path, tmp_path: Path, expected: str
) -> None:
    settings = ApiSettings(stream_verified_only=True)
    async with serving(
        tiny_model, tmp_path / "t.db", settings=settings, engine_type=RetractingPipeline
    ) as s:
        r = await s.client.post("/v1/completions", json={**BODY, "stream": True})
        chunks = events(r.text)
        data = [c for c in chunks if isinstance(c, dict)]
        assert len(data) == 1 and "retract" not in data[0]  # nothing to take back
        assert data[0]["choices"][0]["text"] == expected
        assert "WRONG" not in r.text
        assert set(chunks[:-2]) == {": held"} and chunks[-1] == "[DONE]"


async def stream_from_cluster(
    c: InProcessCluster, tmp_path: Path, settings: ApiSettings
) -> list[Any]:
    """One streamed completion through a scheduler and app over the gateway's engine."""
    gw = c.gateway
    codec = gw.gateway.codec if gw.gateway is not None else None
    assert codec is not None
    store = TaskStore(tmp_path / f"stream-{settings.stream_verified_only}.db")
    scheduler = Scheduler(engine=gw.engine, store=store, detokenize=codec.continuation)
    app = create_app(
        scheduler=scheduler,
        engine=gw.engine,
        codec=codec,
        metrics=Metrics(),
        model_name="tiny",
        settings=settings,
    )
    try:
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://localhost"
            ) as cl,
            asyncio.TaskGroup() as tg,
        ):
            tg.create_task(scheduler.run())
            post = tg.create_task(cl.post("/v1/completions", json={**BODY, "stream": True}))
            await c.until(post.done, "the streamed completion")
            scheduler.shutdown()
        return events(post.result().text)
    finally:
        store.close()


@pytest.mark.parametrize("hold", [False, True], ids=["retract", "hold"])
async def test_a_liar_caught_mid_stream_leaves_only_verified_text(
    tiny_model: Path, tmp_path: Path, expected: str, hold: bool
) -> None:
    """Whatever the liar made the first run produce, the text a client keeps (after
    retractions; or all it got, when held) is the right text, marked verified."""
    settings = ApiSettings(stream_verified_only=hold)
    async with InProcessCluster(
        tiny_model,
        4,
        tmp_path,
        f=1,
        settings={"coordination.heartbeat_interval_ms": 10},
        stage_servers={1: CorruptStageServer},
    ) as c:
        first = await c.first_plan()
        assert first is not None and first.nodes[-1] == 1  # the liar sends the logits
        chunks = await stream_from_cluster(c, tmp_path, settings)
        assert chunks[-1] == "[DONE]" and chunks[-2]["verified"] == "audit", chunks[-2:]
        assert kept_text(chunks) == expected
        if hold:
            assert streamed_text(chunks) == expected  # nothing else was ever sent
        elif streamed_text(chunks) != expected:  # the liar's tokens went out: withdrawn
            assert any(isinstance(ch, dict) and "retract" in ch for ch in chunks)
        assert NodeId(1) in c.gateway.plans.evicted
