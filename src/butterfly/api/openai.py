"""OpenAI-compatible completions, so existing clients and tools work unchanged.

`POST /v1/completions` runs through the same scheduler as `POST /inference` (same queue,
same limits, same checks); `stream: true` answers with server-sent events, one `data:`
chunk per piece of new text and `data: [DONE]` at the end, as OpenAI does. A client that
disconnects mid-stream cancels its task, so abandoned streams do not hold a slot.

Streams tell the truth about verification: text streamed before the audit can be
withdrawn (a chunk with a `retract` object, then the replacement text from the start),
or, with `api.stream_verified_only`, held until the result passed its check. Both
routes take `Authorization: Bearer <token>` when `api.tokens` is set (butterfly.api.guards).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse

from butterfly.api.errors import error_body
from butterfly.api.gateway import Gateway
from butterfly.api.requests import CompletionRequest, parse
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.engine import Retraction
from butterfly.schedule.state import TaskStatus
from butterfly.types.errors import ButterflyError, InvalidRequest
from butterfly.types.tasks import SamplingParams


class IncrementalText:
    """Text deltas of a growing token sequence. A byte-level token may end in the middle
    of a UTF-8 character; such a tail decodes to U+FFFD and is held back until the
    character is complete, so the deltas concatenate to the text of all tokens."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec, self.ids, self.sent = codec, list[int](), ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def flush(self) -> str:
        text = self.codec.decode(self.ids)
        delta, self.sent = text[len(self.sent) :], text
        return delta


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


def completion(
    gw: Gateway,
    task_id: str,
    created: int,
    text: str,
    finish: str | None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One completion object; a streamed chunk is the same shape with the new text."""
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    body: dict[str, Any] = {
        "id": f"cmpl-{task_id}",
        "object": "text_completion",
        "created": created,
        "model": gw.model_name,
        "choices": [choice],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def router(gw: Gateway, limited: Depends) -> APIRouter:
    api = APIRouter(prefix="/v1")

    @api.get("/models")
    async def models() -> dict[str, Any]:
        model = {"id": gw.model_name, "object": "model", "created": 0, "owned_by": "butterfly"}
        return {"object": "list", "data": [model]}

    @api.post("/completions", dependencies=[limited])
    async def completions(request: Request) -> Response:
        body = await parse(request, CompletionRequest, gw.settings.max_request_bytes)
        if body.model != gw.model_name:
            raise InvalidRequest(
                f"model {body.model!r} is not served here; this gateway serves {gw.model_name!r}"
            )
        if gw.codec is None:
            raise InvalidRequest("this model has no tokenizer, so it has no text completions")
        ids = await gw.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        sampling = SamplingParams(body.temperature, body.top_k, body.top_p, body.seed)
        task = gw.token_task(ids, body.max_tokens, sampling)
        await gw.scheduler.submit(task)
        created = int(time.time())
        if body.stream:
            events = stream_events(gw, gw.codec, task.task_id, created)
            return StreamingResponse(events, media_type="text/event-stream")
        snap = await gw.scheduler.wait(task.task_id, gw.settings.max_wait_s)
        if snap.state.status is not TaskStatus.COMPLETED or snap.result is None:
            return gw.outcome(snap)  # an error, or 202 if it outlived the wait limit
        out = snap.result.output_ids
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(out),
            "total_tokens": len(ids) + len(out),
        }
        finish = gw.finish_reason(out)
        answer = completion(gw, task.task_id, created, snap.result.text, finish, usage)
        answer["verified"] = snap.result.verified  # an extension: which check it passed
        return JSONResponse(answer)

    return api


def retraction(gw: Gateway, task_id: str, created: int, event: Retraction) -> dict[str, Any]:
    """The chunk that withdraws all text streamed so far: a completion chunk with no text
    (a client that does not know it appends nothing) and a `retract` object."""
    body = completion(gw, task_id, created, "", None)
    body["retract"] = {"object": "butterfly.retraction", "reason": event.reason}
    return body


HELD = ": held\n\n"
"""An SSE comment per token held back (`api.stream_verified_only`): clients ignore it,
and the connection shows progress instead of looking idle to proxies."""


async def stream_events(
    gw: Gateway, codec: TextCodec, task_id: str, created: int
) -> AsyncIterator[str]:
    """The task's text as SSE chunks. A re-run that replaces the tokens streamed so far
    (an audit caught a liar) sends a `retraction` chunk first; with
    `api.stream_verified_only` no text leaves before the task finished, its check
    included, and then all of it in one chunk. The last chunk says `verified`."""
    hold = gw.settings.stream_verified_only
    text = IncrementalText(codec)
    finished = False
    try:
        async for token in gw.scheduler.stream(task_id):
            if hold:  # nothing was sent, so a retraction has nothing to withdraw
                if not isinstance(token, Retraction):
                    yield HELD
            elif isinstance(token, Retraction):
                text = IncrementalText(codec)
                yield sse(retraction(gw, task_id, created, token))
            elif delta := text.push(token):
                yield sse(completion(gw, task_id, created, delta, None))
        snap = await gw.scheduler.snapshot(task_id)
        finished = snap.state.terminal
        if snap.state.status is TaskStatus.COMPLETED:
            result = snap.result
            out = result.output_ids if result is not None else ()
            if hold:  # all of it now (the scheduler detokenized it, when it could)
                rest = result.text if result and result.text else codec.decode([*out])
            else:
                rest = text.flush()
            last = completion(gw, task_id, created, rest, gw.finish_reason(tuple(out)))
            last["verified"] = result.verified if result is not None else "none"
            yield sse(last)
        elif finished:
            kind = snap.state.error_type or "task_cancelled"
            yield sse(error_body(kind, snap.state.reason or f"task {task_id} was cancelled"))
        else:  # the scheduler stopped under it; the task runs again after a restart
            message = f"the gateway is shutting down; read /result/{task_id} once it is back"
            yield sse(error_body("service_unavailable", message))
        yield sse("[DONE]")
    finally:
        # The client went away mid-stream: stop the work it asked for. Not when the
        # gateway is stopping: then the task must stay queued for the restart.
        if not finished and gw.scheduler.serving:
            with anyio.CancelScope(shield=True), contextlib.suppress(ButterflyError):
                await gw.scheduler.cancel(task_id)  # suppressed: it finished meanwhile


__all__ = ["HELD", "IncrementalText", "completion", "retraction", "router"]
