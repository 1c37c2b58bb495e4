"""What an outsider's review of the OpenAI API found (twenty-fourth session): a 400's
`param` names the field at fault wherever one is, chat's logprob `bytes` join into the
content, and HEAD /health answers as GET does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.api_util import assert_error, serving

pytestmark = pytest.mark.anyio
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# OpenAI SDKs raise their own typed errors from `param` (README, Errors); each of these
# answered param null
PARAM_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/completions", {"prompt": [-1, 5], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [999999]], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 0}, "max_tokens"),
    (
        "/v1/completions",
        {"prompt": "Once", "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    (
        "/v1/chat/completions",
        {"messages": USER, "chat_template_kwargs": {"messages": 1}},
        "chat_template_kwargs",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), PARAM_CASES)
async def test_a_400_names_the_field_at_fault(
    tiny_model: Path, tmp_path: Path, path: str, body: dict[str, Any], param: str
) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        r = await s.client.post(path, json={"model": "tiny", **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param, error
        assert "input_ids" not in error["message"], error  # no such field here
        assert "multiple values" not in error["message"], error  # Python's own words


async def test_the_templates_own_variables_are_named_when_refused(
    tiny_model: Path, tmp_path: Path
) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = {"messages": USER, "chat_template_kwargs": {"bos_token": "x", "day": 1}}
        r = await s.client.post("/v1/chat/completions", json={"model": "tiny", **body})
        assert r.status_code == 400
        assert "bos_token cannot be set" in r.json()["error"]["message"]
        body = {"messages": USER, "chat_template_kwargs": {"day": 1}, "max_tokens": 1}
        r = await s.client.post("/v1/chat/completions", json={"model": "tiny", **body})
        assert r.status_code == 200, r.text  # a variable of the request's own still works


async def test_chat_logprob_bytes_join_into_the_content(tiny_model: Path, tmp_path: Path) -> None:
    """Seed 1 samples <|bos|> first: the content leaves a special token out, and its
    entry's bytes carried its name."""
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = {"model": "tiny", "messages": USER, "max_tokens": 3, "seed": 1, "logprobs": True}
        r = await s.client.post("/v1/chat/completions", json={**body, "top_logprobs": 5})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        entries = choice["logprobs"]["content"]
        assert any(e["token"] == "<|bos|>" for e in entries)  # the case under test
        joined = b"".join(bytes(t["bytes"]) for t in entries)
        assert joined.decode("utf-8", "replace") == choice["message"]["content"]
        for e in entries:
            assert (e["bytes"] == []) == (e["token"] == "<|bos|>"), e
            assert all(t["bytes"] or t["token"].startswith("<|") for t in e["top_logprobs"])


async def test_the_native_apis_errors_name_its_own_fields(tiny_model: Path, tmp_path: Path) -> None:
    """/inference has `input_ids` and `prompt`; its 400s named `prompt` for both. A bad
    `wait` of /result is named too, whatever is wrong with it."""
    async with serving(tiny_model, tmp_path / "t.db") as s:
        r = await s.client.post("/inference", json={"input_ids": [5, 100000]})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "input_ids" and error["message"].startswith("input_ids:")
        r = await s.client.post("/inference", json={"input_ids": [5] * 600})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_ids", r.text
        task_id = (await s.client.post("/inference", json={"input_ids": [5]})).json()["task_id"]
        for wait in ("soon", "-1", "nan"):  # the last two named no param (a review)
            r = await s.client.get(f"/result/{task_id}?wait={wait}")
            assert_error(r, 400, "invalid_request", "wait")
            assert r.json()["error"]["param"] == "wait", (wait, r.text)


async def test_a_load_balancers_head_probe_of_health(tiny_model: Path, tmp_path: Path) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        got = await s.client.get("/health")
        head = await s.client.head("/health")
        assert head.status_code == got.status_code and head.content == b""


def sse(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line.removeprefix("data: ")))
    return out


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_stream_of_several_choices_names_each_ones_task(
    tiny_model: Path, tmp_path: Path, path: str
) -> None:
    """The chunks' id names the first choice's task: after a broken n = 2 stream the
    second choice's text, still computed, was lost to the client (a review). The first
    chunk names every choice's task, and each one's result is that choice's text."""
    what = {"prompt": "Once"} if path == "/v1/completions" else {"messages": USER}
    body = {"model": "tiny", **what, "n": 2, "max_tokens": 4, "stream": True, "seed": 3}
    async with serving(tiny_model, tmp_path / "t.db") as s:
        r = await s.client.post(path, json={**body, "temperature": 1.0})
        assert r.status_code == 200, r.text
        chunks = sse(r.text)
        ids = chunks[0]["task_ids"]
        assert len(ids) == 2 and chunks[0]["id"].endswith(ids[0])
        assert all("task_ids" not in c for c in chunks[1:])
        texts = ["", ""]
        for c in chunks:
            for choice in c["choices"]:
                got = choice.get("text") or choice.get("delta", {}).get("content") or ""
                texts[choice["index"]] += got
        for i, task_id in enumerate(ids):
            result = (await s.client.get(f"/result/{task_id}", params={"wait": 30})).json()
            assert result["text"] == texts[i], (result, texts)
        one = await s.client.post(path, json={**body, "n": 1})
        assert "task_ids" not in sse(one.text)[0]  # one choice: the id says it all
