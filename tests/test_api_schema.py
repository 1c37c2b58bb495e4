"""The gateway against its own OpenAPI document: schemathesis generates requests from
`/openapi.json` (valid ones and ones the schema forbids) for every route and checks that
none gets a 5xx and that every answer (status, content type, body) is one the document
declares. The app runs over a real scheduler and a two-stage in-process pipeline of the
tiny model, served by uvicorn on a loopback port from a thread of this process.
Seeded (derandomized) and bounded, so a run is the same every time and stays short.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from butterfly.api.settings import ApiSettings
from butterfly.cli.launcher import free_port_block
from tests.api_util import serving

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = 20  # per route and mode: 15 s of CPU in all (56 s of wall time at load average 20)
SETTINGS = ApiSettings(
    max_request_bytes=16 * 1024, max_new_tokens_limit=32, default_max_new_tokens=4, max_wait_s=30
)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[str]:
    """The app served from a thread, with its scheduler on that thread's loop."""
    port, ready, stop = free_port_block(1), threading.Event(), threading.Event()
    db = tmp_path_factory.mktemp("schema") / "t.db"
    failure: list[BaseException] = []

    async def main() -> None:
        async with serving(tiny_model, db, settings=SETTINGS) as s:
            config = uvicorn.Config(s.app, host="127.0.0.1", port=port, log_level="error")
            server = uvicorn.Server(config)
            serve = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.01)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            server.should_exit = True
            await serve

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # reported by the fixture
            failure.append(e)
            ready.set()

    thread = threading.Thread(target=run, name="schema-api", daemon=True)
    thread.start()
    assert ready.wait(60) and not failure, failure
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


def fuzz(op: Any, mode: GenerationMode, base_url: str, statuses: set[int]) -> None:
    """Seeded examples of one route in one mode; raises what schemathesis found."""

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        response = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=60)
        statuses.add(response.status_code)

    check()


def test_every_route_answers_as_its_schema_says(base_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    problems: list[str] = []
    seen: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/inference",
    }
    bodies = {op.path for op in operations if op.body}
    assert {"/v1/completions", "/v1/chat/completions", "/inference"} <= bodies  # declared
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz(op, mode, base_url, seen.setdefault(op.path, set()))
            except Unsatisfiable:  # nothing to negate: a route without parameters or body
                assert mode is GenerationMode.NEGATIVE
            except Exception as e:  # every route's problems, then one assert
                problems.append(f"{op.method.upper()} {op.path} ({mode.value}): {e}")
    # a valid request of each generating route too, held to the same checks: the
    # fuzzer's bodies for chat mostly name roles the tiny model's template refuses, and
    # which examples it draws moved with the schema (every chat example of one run was
    # refused: a schema change, no bug)
    valid = {
        "/v1/completions": {"model": "tiny", "prompt": "Once", "max_tokens": 2},
        "/v1/chat/completions": {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        },
    }
    for op in operations:
        if op.path in valid and op.method.upper() == "POST":
            try:
                case = op.Case(body=valid[op.path], media_type="application/json")
                response = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=60)
                seen[op.path].add(response.status_code)
            except Exception as e:
                problems.append(f"POST {op.path} (a valid body): {e}")
    assert not problems, "\n\n".join(problems)
    for path in ("/v1/completions", "/v1/chat/completions"):  # generation ran, and refusals
        assert {200, 400} <= seen[path], (path, seen[path])
