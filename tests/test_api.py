"""The gateway's native HTTP API against a real Scheduler, pipeline engine and SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from butterfly.api.app import create_app
from butterfly.api.settings import ApiSettings
from butterfly.metrics.prometheus import Metrics
from butterfly.runtime.loader import load_stage
from butterfly.runtime.sequential import create_sequential
from butterfly.schedule.queue import QueuePolicy
from butterfly.schedule.scheduler import Scheduler
from butterfly.schedule.store import TaskStore
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.model import LayerRange
from butterfly.types.tasks import SamplingParams
from tests.api_util import (
    BrokenHealthEngine,
    assert_error,
    reference,
    serving,
    statuses_of_a_client_hanging_up,
    still_serves,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_wait_true_gives_generate_tokens(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        r = await s.client.post(
            "/inference", json={"prompt": "Butterfly", "max_new_tokens": 12, "wait": True}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        ids = s.codec.encode("Butterfly")
        expected = reference(tiny_model, ids, 12, SamplingParams())
        assert body["output_ids"] == expected
        assert body["text"] == s.codec.decode(expected)
        assert body["prompt_tokens"] == len(ids)
        assert body["stages"] == [{"node": 0, "layers": [0, 2]}, {"node": 1, "layers": [2, 4]}]
        assert body["verified"] == "none" and body["timings"]["total_s"] > 0


async def test_a_wait_true_client_that_hangs_up_has_its_task_cancelled(
    tiny_model: Path, tmp_path: Path
) -> None:
    """It never learned the task's id: the task ran its 500 tokens for nobody, and a retry
    ran beside it."""
    async with serving(tiny_model, tmp_path / "t.db", max_concurrent=1) as s:
        body = {"prompt": "bye", "max_new_tokens": 500, "wait": True}
        statuses = await statuses_of_a_client_hanging_up(s, "/inference", body)
        assert statuses == [499]
        text = (await s.client.get("/metrics")).text
        assert 'butterfly_tasks_total{status="cancelled"} 1.0' in text
        assert 'butterfly_tasks_total{status="completed"} 0.0' in text
        await still_serves(s)


async def test_accept_then_poll_status_and_result(tiny_model: Path, tmp_path: Path) -> None:
    request = {"input_ids": [256, 66, 117, 103], "max_new_tokens": 20, "temperature": 0.9}
    request |= {"top_k": 50, "top_p": 0.95, "seed": 42}
    async with serving(tiny_model, tmp_path / "t.db") as s:
        r = await s.client.post("/inference", json=request)
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        assert r.headers["location"] == f"/result/{task_id}"
        status = (await s.client.get(f"/status/{task_id}")).json()
        assert status["task_id"] == task_id and status["status"] in {"queued", "computing"}
        r = await s.client.get(f"/result/{task_id}", params={"wait": 30})
        assert r.status_code == 200
        sampling = SamplingParams(0.9, 50, 0.95, 42)
        assert r.json()["output_ids"] == reference(tiny_model, [256, 66, 117, 103], 20, sampling)
        done = (await s.client.get(f"/status/{task_id}")).json()
        assert done["status"] == "completed" and done["tokens_generated"] == 20


BAD_INPUTS: list[tuple[Any, int, str, tuple[str, ...]]] = [
    ({"prompt": "x", "max_tokens": 5}, 400, "invalid_request", ("unknown field", "max_tokens")),
    ("{not json", 400, "invalid_request", ("not valid JSON",)),
    ("[1, 2]", 400, "invalid_request", ("object",)),
    ("", 400, "invalid_request", ("empty",)),
    ({"prompt": "x" * 600}, 400, "invalid_request", ("601", "512")),
    ({"prompt": "x" * 500, "max_new_tokens": 100}, 400, "invalid_request", ("501", "512")),
    ({"prompt": "x", "max_new_tokens": 0}, 400, "invalid_request", ("max_new_tokens", "1024")),
    ({"prompt": "x", "max_new_tokens": 5000}, 400, "invalid_request", ("5000", "1024")),
    ({"prompt": "x", "max_new_tokens": 1.5}, 400, "invalid_request", ("max_new_tokens",)),
    ({"prompt": "x", "temperature": "hot"}, 400, "invalid_request", ("temperature",)),
    ({"prompt": "x", "temperature": -1}, 400, "invalid_request", ("temperature",)),
    ({"prompt": "x", "top_p": 0}, 400, "invalid_request", ("top_p",)),
    ({"prompt": "x", "input_ids": [1]}, 400, "invalid_request", ("exactly one",)),
    ({"max_new_tokens": 3}, 400, "invalid_request", ("exactly one",)),
    ({"input_ids": []}, 400, "invalid_request", ("empty",)),
    ({"input_ids": [5, 100000]}, 400, "invalid_request", ("100000",)),
    ({"input": [0.5, 1.5]}, 400, "invalid_request", ("input vector",)),
    ({"prompt": "x", "wait": "yes"}, 400, "invalid_request", ("wait",)),
]


async def test_every_bad_input_gets_its_4xx_and_the_app_keeps_serving(
    tiny_model: Path, tmp_path: Path
) -> None:
    settings = ApiSettings(max_request_bytes=4096)
    async with serving(tiny_model, tmp_path / "t.db", settings=settings) as s:
        for body, status, kind, words in BAD_INPUTS:
            if isinstance(body, str):
                r = await s.client.post(
                    "/inference", content=body, headers={"content-type": "application/json"}
                )
            else:
                r = await s.client.post("/inference", json=body)
            assert_error(r, status, kind, *words)
        big = {"prompt": "y" * 5000}
        assert_error(await s.client.post("/inference", json=big), 413, "payload_too_large", "4096")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b" " * 1000

        r = await s.client.post("/inference", content=chunks())
        assert_error(r, 413, "payload_too_large", "4096")
        for method, url in [("GET", "/status/nope"), ("GET", "/result/nope")]:
            assert_error(await s.client.request(method, url), 404, "task_not_found", "nope")
        assert_error(await s.client.delete("/tasks/nope"), 404, "task_not_found")
        assert_error(await s.client.get("/result/x?wait=-1"), 400, "invalid_request", "wait")
        assert_error(await s.client.get("/result/x?wait=soon"), 400, "invalid_request", "wait")
        assert_error(await s.client.get("/nowhere"), 404, "not_found", "/nowhere")
        assert_error(await s.client.put("/inference"), 405, "method_not_allowed")
        await still_serves(s)
        assert s.scheduler.serving


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/completions", "POST"),
        ("GET", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET"),
        ("PUT", "/inference", "POST"),
    ],
)
async def test_a_405_says_which_methods_the_route_takes(
    tiny_model: Path, tmp_path: Path, method: str, path: str, allowed: str
) -> None:
    """RFC 9110 requires `Allow` on a 405; the error handler dropped Starlette's."""
    async with serving(tiny_model, tmp_path / "t.db", run=False) as s:
        r = await s.client.request(method, path)
        assert_error(r, 405, "method_not_allowed")
        assert allowed in r.headers.get("allow", "").split(", "), dict(r.headers)


async def test_full_queue_is_429_with_retry_after(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db", run=False, queue_capacity=1) as s:
        assert (await s.client.post("/inference", json={"prompt": "a"})).status_code == 202
        r = await s.client.post("/inference", json={"prompt": "b"})
        assert_error(r, 429, "queue_full", "full")
        assert r.headers["retry-after"] == "1"


async def test_rate_limit_per_client(tiny_model: Path, tmp_path: Path) -> None:
    settings = ApiSettings(rate_limit_per_s=0.01, rate_limit_burst=2)
    async with serving(tiny_model, tmp_path / "t.db", settings=settings, run=False) as s:
        for _ in range(2):
            assert (await s.client.post("/inference", json={"prompt": "a"})).status_code == 202
        r = await s.client.post("/inference", json={"prompt": "a"})
        assert_error(r, 429, "rate_limited", "requests/s")
        assert "retry-after" in r.headers
        assert (await s.client.get("/health")).status_code == 503  # not rate limited


async def test_priority_sets_the_queue_order(tiny_model: Path, tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with serving(tiny_model, db, run=False, policy=QueuePolicy.PRIORITY) as s:
        ids = []
        for p in (0, 9, 3):
            r = await s.client.post("/inference", json={"prompt": "p", "priority": p})
            ids.append(r.json()["task_id"])
        positions = [(await s.client.get(f"/status/{i}")).json()["queue_position"] for i in ids]
        assert positions == [2, 0, 1]


async def test_cancel_needs_the_token_and_is_final(tiny_model: Path, tmp_path: Path) -> None:
    settings = ApiSettings(api_tokens=frozenset({"s3cret"}))
    async with serving(tiny_model, tmp_path / "t.db", settings=settings, max_concurrent=1) as s:
        right = {"authorization": "Bearer s3cret"}
        body = {"prompt": "go on", "max_new_tokens": 500}
        task_id = (await s.client.post("/inference", json=body, headers=right)).json()["task_id"]
        assert_error(await s.client.delete(f"/tasks/{task_id}"), 401, "unauthorized", "Bearer")
        wrong = {"authorization": "Bearer nope"}
        assert_error(await s.client.delete(f"/tasks/{task_id}", headers=wrong), 401, "unauthorized")
        r = await s.client.delete(f"/tasks/{task_id}", headers=right)
        assert r.status_code == 200 and r.json() == {"task_id": task_id, "status": "cancelled"}
        r = await s.client.delete(f"/tasks/{task_id}", headers=right)  # idempotent
        assert r.status_code == 200 and r.json() == {"task_id": task_id, "status": "cancelled"}
        r = await s.client.get(f"/result/{task_id}", headers=right)
        assert_error(r, 409, "task_cancelled")
        await still_serves(s, headers=right)


async def test_result_wait_returns_202_while_unfinished(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db", run=False) as s:
        task_id = (await s.client.post("/inference", json={"prompt": "a"})).json()["task_id"]
        r = await s.client.get(f"/result/{task_id}", params={"wait": 0.05})
        assert r.status_code == 202 and r.json() == {"task_id": task_id, "status": "queued"}


async def test_health_and_metrics(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        r = await s.client.get("/health")
        assert r.status_code == 200
        health = r.json()
        assert health["healthy"] is True
        assert health["services"] == {"runtime": "ok", "scheduling": "ok"}
        assert [(n["id"], n["layers"]) for n in health["nodes"]] == [(0, [0, 2]), (1, [2, 4])]
        assert {n["status"] for n in health["nodes"]} == {"healthy"}

        def sample(text: str, name: str, **labels: str) -> float:
            for family in text_string_to_metric_families(text):
                for smp in family.samples:
                    if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                        return float(smp.value)
            raise AssertionError(f"{name} {labels} not in /metrics")

        before = (await s.client.get("/metrics")).text
        await still_serves(s)
        r = await s.client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        completed = "butterfly_tasks_total"
        assert sample(r.text, completed, status="completed") == 1 + sample(
            before, completed, status="completed"
        )
        assert sample(r.text, "butterfly_time_to_first_token_seconds_count") == 1
        assert sample(r.text, "butterfly_task_latency_seconds_count") == 1
        assert sample(r.text, "butterfly_time_per_output_token_seconds_count") == 1


async def test_unhandled_error_is_a_500_in_shape_and_serving_goes_on(
    tiny_model: Path, tmp_path: Path
) -> None:
    async with serving(tiny_model, tmp_path / "t.db", engine_type=BrokenHealthEngine) as s:
        r = await s.client.get("/health")
        assert_error(r, 500, "internal_error", "RuntimeError")
        assert "exploded" not in r.text  # internals stay in the log
        await still_serves(s)


async def test_gateway_restart_runs_a_task_queued_before(tiny_model: Path, tmp_path: Path) -> None:
    db = tmp_path / "data" / "tasks.sqlite"
    request = {"prompt": "survive", "max_new_tokens": 8, "temperature": 1.0, "seed": 9}
    async with serving(tiny_model, db, run=False) as s:  # accepted, never dispatched
        r = await s.client.post("/inference", json=request)
        assert r.status_code == 202
        task_id = r.json()["task_id"]
        ids = s.codec.encode("survive")
    async with serving(tiny_model, db) as s:  # a new gateway on the same file
        r = await s.client.get(f"/result/{task_id}", params={"wait": 60})
        assert r.status_code == 200, r.text
        expected = reference(tiny_model, ids, 8, SamplingParams(1.0, 0, 1.0, 9))
        assert r.json()["output_ids"] == expected
    async with serving(tiny_model, db, run=False) as s:  # and the result stays readable
        r = await s.client.get(f"/result/{task_id}")
        assert r.status_code == 200 and r.json()["output_ids"] == expected


async def test_vector_input_model(tmp_path: Path) -> None:
    """The specification's example: a stack over input vectors, no tokenizer."""
    spec = [
        {"type": "linear", "input_dim": 3, "output_dim": 8},
        {"type": "activation", "kind": "relu"},
        {"type": "transformer_block", "hidden_dim": 8, "num_heads": 2, "ff_dim": 16},
        {"type": "linear", "input_dim": 8, "output_dim": 2},
    ]
    model = create_sequential(tmp_path / "seq", spec, input_dim=3, seed=1)
    async with LocalPipeline(model, [LayerRange(0, 2), LayerRange(2, 4)]) as engine:
        store, metrics = TaskStore(tmp_path / "t.db"), Metrics()
        scheduler = Scheduler(engine=engine, store=store, emit=metrics.emit)
        app = create_app(
            scheduler=scheduler,
            engine=engine,
            codec=None,
            metrics=metrics,
            model_name="seq",
            settings=ApiSettings(),
        )
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://localhost") as client,
            asyncio.TaskGroup() as tg,
        ):
            tg.create_task(scheduler.run())
            r = await client.post("/inference", json={"input": [0.5, -1.0, 2.0], "wait": True})
            assert r.status_code == 200, r.text
            stage = load_stage(model)
            with torch.inference_mode():
                expected = stage.forward(torch.tensor([0.5, -1.0, 2.0]), None, 0).flatten()
            assert r.json()["output_vector"] == pytest.approx(expected.tolist(), rel=1e-5)
            r = await client.post("/inference", json={"prompt": "text"})
            assert_error(r, 400, "invalid_request", "no tokenizer")
            r = await client.post("/inference", json={"input_ids": [1, 2]})
            assert_error(r, 400, "invalid_request", "input vector")
            r = await client.post("/inference", json={"input": []})
            assert_error(r, 400, "invalid_request", "empty")
            r = await client.post("/inference", json={"input": [1.0, 2.0], "wait": True})
            assert_error(r, 400, "invalid_input", "3 features")  # the width, from the stage
            # generation fields were accepted and dropped (a review): refused, named
            for extra in ({"max_new_tokens": 7}, {"temperature": 1.5}, {"top_k": 3}, {"seed": 4}):
                r = await client.post("/inference", json={"input": [0.5, -1.0, 2.0], **extra})
                assert_error(r, 400, "invalid_request", f"{next(iter(extra))} does not apply")
            r = await client.post("/inference", json={"input": [1.0], "top_p": 0.5, "seed": 1})
            assert_error(r, 400, "invalid_request", "seed, top_p do not apply to `input`")
            scheduler.shutdown()
    store.close()
