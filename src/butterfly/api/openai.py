"""OpenAI-compatible routes, so existing clients and tools work unchanged.

`POST /v1/completions` and `POST /v1/chat/completions` run through the same scheduler as
`POST /inference` (same queue, same limits, same checks); `stream: true` answers with
server-sent events as OpenAI does, ending with `data: [DONE]`. A client that disconnects
mid-stream cancels its tasks, so abandoned streams do not hold a slot. The model is
named `model.served_name` (default: the model directory's name).

Streams tell the truth about verification: text streamed before the audit can be
withdrawn (a chunk with a `retract` object, then the replacement text from the start),
or, with `api.stream_verified_only`, held until the result passed its check. Both
routes take `Authorization: Bearer <token>` when `api.tokens` is set (butterfly.api.guards).
Which request fields are acted on and which are accepted and ignored: `openai_schema`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.params import Depends
from fastapi.responses import Response, StreamingResponse

from butterfly.api.errors import InvalidField, ModelNotFound
from butterfly.api.gateway import Gateway
from butterfly.api.openai_choices import ChoiceText, chat_logprobs, completion_logprobs
from butterfly.api.openai_run import Run, start, stream, whole
from butterfly.api.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    Finish,
    ModelCard,
    ModelList,
    SamplingFields,
)
from butterfly.api.openapi_docs import ERRORS, body_of, errors, streamed
from butterfly.api.requests import parse
from butterfly.runtime.chat import ChatTemplate
from butterfly.runtime.sampling import is_greedy
from butterfly.runtime.tokenizer import TextCodec
from butterfly.types.errors import InvalidRequest
from butterfly.types.tasks import SEED_SPAN, SamplingParams


def _model(gw: Gateway, name: str) -> None:
    if name != gw.model_name:
        raise ModelNotFound(
            f"model {name!r} is not served here; this gateway serves {gw.model_name!r}"
        )


def _codec(gw: Gateway) -> TextCodec:
    if gw.codec is None:
        raise InvalidRequest("this model has no tokenizer, so it has no text completions")
    return gw.codec


def _unset(given: dict[str, Any]) -> set[str]:
    """The top-level extensions a chunk leaves out rather than sending as null."""
    return {"usage", "verified", "task_ids"} - {k for k, v in given.items() if v is not None}


def _sampling(
    body: SamplingFields, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    return SamplingParams(
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=None if body.seed is None else body.seed % SEED_SPAN,  # a negative one folded
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=body.biases(),
    )


class CompletionChunks:
    """`/v1/completions`: chunks are completion objects with the new text."""

    def __init__(self, gw: Gateway, created: int, body: CompletionRequest) -> None:
        self.gw, self.created, self.body = gw, created, body
        self.scores_prompt = body.echo and body.logprobs is not None

    def _object(self, run: Run, choices: list[CompletionChoice], **extra: Any) -> dict[str, Any]:
        if self.body.stream:
            extra["task_ids"] = run.task_ids()
        return Completion(
            id=f"cmpl-{run.tasks[0].task_id}",
            created=self.created,
            model=self.gw.model_name,
            choices=choices,
            **extra,
        ).model_dump(exclude=_unset(extra))

    def _choice(self, choice: ChoiceText, text: str, finish: Finish | None) -> CompletionChoice:
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = completion_logprobs(choice, choice.take_pending())
        return CompletionChoice(
            text=text,
            index=choice.index,
            logprobs=logprobs,
            finish_reason=finish,
        )

    def _echo(self, choice: ChoiceText) -> str:
        return str(choice.tokenizer.decode(choice.prompt, skip_special_tokens=True))

    def opening(self, run: Run, index: int) -> dict[str, Any] | None:
        """The echoed prompt, with its logprobs when asked (the choice holds them)."""
        if not self.body.echo:
            return None
        logprobs, choice = None, run.choices[index]
        if self.scores_prompt:
            logprobs = completion_logprobs(choice, [], choice.prompt)
        echoed = CompletionChoice(text=self._echo(choice), index=index, logprobs=logprobs)
        return self._object(run, [echoed])

    def delta(self, run: Run, choice: ChoiceText, text: str) -> dict[str, Any]:
        return self._object(run, [self._choice(choice, text, None)])

    def last(self, run: Run, choice: ChoiceText, text: str, verified: str) -> dict[str, Any]:
        return self._object(run, [self._choice(choice, text, choice.finish)], verified=verified)

    def retraction(self, run: Run, index: int, reason: str) -> dict[str, Any]:
        body = self._object(run, [CompletionChoice(text="", index=index)])
        body["retract"] = {"object": "butterfly.retraction", "reason": reason}
        return body

    def usage(self, run: Run) -> dict[str, Any]:
        return self._object(run, [], usage=run.usage())

    def whole(self, run: Run, verified: str) -> dict[str, Any]:
        choices = []
        for c in run.choices:
            prefix = self._echo(c) if self.body.echo else ""
            logprobs = None
            if self.body.logprobs is not None:
                echoed = c.prompt if self.body.echo else []
                logprobs = completion_logprobs(c, c.scored, echoed)
            choices.append(
                CompletionChoice(
                    text=prefix + c.emitted,
                    index=c.index,
                    logprobs=logprobs,
                    finish_reason=c.finish,
                )
            )
        return self._object(run, choices, usage=run.usage(), verified=verified)


class ChatChunks:
    """`/v1/chat/completions`: chunks are `chat.completion.chunk` objects with deltas."""

    def __init__(self, gw: Gateway, created: int, body: ChatCompletionRequest) -> None:
        self.gw, self.created, self.body = gw, created, body
        self.scores_prompt = False  # chat has no echo

    def _chunk(self, run: Run, choices: list[ChunkChoice], **extra: Any) -> dict[str, Any]:
        extra["task_ids"] = run.task_ids()
        body = ChatCompletionChunk(
            id=f"chatcmpl-{run.tasks[0].task_id}",
            created=self.created,
            model=self.gw.model_name,
            choices=choices,
            **extra,
        ).model_dump(exclude=_unset(extra))
        for choice in body["choices"]:  # as OpenAI: a delta names only what it carries
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return body

    def _logprobs(self, choice: ChoiceText) -> ChoiceLogprobs | None:
        if not self.body.logprobs:
            return None
        return ChoiceLogprobs(content=chat_logprobs(choice, choice.take_pending()))

    def opening(self, run: Run, index: int) -> dict[str, Any] | None:
        return self._chunk(
            run, [ChunkChoice(index=index, delta=Delta(role="assistant", content=""))]
        )

    def delta(self, run: Run, choice: ChoiceText, text: str) -> dict[str, Any]:
        item = ChunkChoice(
            index=choice.index, delta=Delta(content=text), logprobs=self._logprobs(choice)
        )
        return self._chunk(run, [item])

    def last(self, run: Run, choice: ChoiceText, text: str, verified: str) -> dict[str, Any]:
        item = ChunkChoice(
            index=choice.index,
            delta=Delta(content=text) if text else Delta(),
            logprobs=self._logprobs(choice),
            finish_reason=choice.finish,
        )
        return self._chunk(run, [item], verified=verified)

    def retraction(self, run: Run, index: int, reason: str) -> dict[str, Any]:
        body = self._chunk(run, [ChunkChoice(index=index, delta=Delta())])
        body["retract"] = {"object": "butterfly.retraction", "reason": reason}
        return body

    def usage(self, run: Run) -> dict[str, Any]:
        return self._chunk(run, [], usage=run.usage())

    def whole(self, run: Run, verified: str) -> dict[str, Any]:
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.emitted),
                logprobs=(
                    ChoiceLogprobs(content=chat_logprobs(c, c.scored))
                    if self.body.logprobs
                    else None
                ),
                finish_reason=c.finish,
            )
            for c in run.choices
        ]
        return ChatCompletion(
            id=f"chatcmpl-{run.tasks[0].task_id}",
            created=self.created,
            model=self.gw.model_name,
            choices=choices,
            usage=run.usage(),
            verified=verified,
        ).model_dump()


def render_chat(chat: ChatTemplate, body: ChatCompletionRequest) -> str:
    """The prompt text of a chat request, through the model's template."""
    return chat.render(
        template_messages(body.messages),
        add_generation_prompt=body.add_generation_prompt,
        extra=body.chat_template_kwargs,
    )


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: text parts joined, `developer` (OpenAI's
    newer name) as `system`, which is what templates know."""
    out = []
    for m in messages:
        message = m.model_dump(exclude_none=True)
        content = m.content
        if isinstance(content, list):
            message["content"] = "\n".join(part.text for part in content)
        elif content is None:
            message["content"] = ""
        if m.role == "developer":
            message["role"] = "system"
        out.append(message)
    return out


def _card(gw: Gateway) -> ModelCard:
    return ModelCard(id=gw.model_name, created=0, owned_by="butterfly")


def router(gw: Gateway, limited: Depends) -> APIRouter:
    api = APIRouter(prefix="/v1")

    @api.get("/models", response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        """The one model this cluster serves, under `model.served_name`."""
        return ModelList(data=[_card(gw)])

    @api.get("/models/{model:path}", response_model=ModelCard, responses=errors(401, 404, 500))
    async def model(model: str) -> ModelCard:
        """That model (`client.models.retrieve`), or 404 `model_not_found`."""
        _model(gw, model)
        return _card(gw)

    @api.post(
        "/completions",
        dependencies=[limited],
        responses=streamed(Completion),
        openapi_extra=body_of(CompletionRequest),
    )
    async def completions(request: Request) -> Response:
        """Text completion of a prompt (text or token ids)."""
        body = await parse(request, CompletionRequest, gw.settings.max_request_bytes)
        _model(gw, body.model)
        codec = _codec(gw)
        prompts = [await gw.encode(p) if isinstance(p, str) else p for p in body.prompts()]
        # echo with logprobs: the prompt's tokens scored too (only then: it costs the
        # last stage every prompt position's logits)
        sampling = _sampling(body, body.logprobs, body.logprobs if body.echo else None)
        if body.max_tokens == 0 and not body.echo:
            raise InvalidField(
                "max_tokens 0 generates nothing: it is for `echo` (the prompt, with its "
                "logprobs when `logprobs` is set, as evaluation harnesses ask); give at least 1",
                "max_tokens",
            )
        max_tokens = body.max_tokens
        if "max_tokens" not in body.model_fields_set and max_tokens is not None:
            max_tokens = min(max_tokens, gw.settings.max_new_tokens_limit)  # as chat's
        # best_of: that many candidates per prompt, scored, the n best returned (greedy
        # ones, top_k 1 included, are all alike, and so are prompts scored with no new
        # token: n of them are as good as any)
        alike = is_greedy(sampling) or sampling.top_k == 1 or body.max_tokens == 0
        best_of = body.n if body.best_of is None or alike else body.best_of
        if best_of > body.n and body.stream:
            raise InvalidField(
                "best_of above n cannot stream: the best are known only once every "
                "candidate has finished (as OpenAI refuses it)",
                "best_of",
            )
        drawn = sampling
        if best_of > body.n and sampling.logprobs is None:  # scores to rank, not returned
            drawn = replace(sampling, logprobs=0)
        run = await start(
            gw,
            codec,
            prompts,
            max_tokens,
            drawn,
            best_of,
            body.stops(),
            fewest=0,
            per_prompt="best_of" if best_of > body.n else "n",
        )
        chunks = CompletionChunks(gw, int(time.time()), body)
        if body.stream:
            events = stream(run, chunks, body.include_usage())
            return StreamingResponse(events, media_type="text/event-stream")
        best = body.n if best_of > body.n else None
        return await whole(run, chunks.whole, request.is_disconnected, best)

    @api.post(
        "/chat/completions",
        dependencies=[limited],
        responses=streamed(ChatCompletion),
        openapi_extra=body_of(ChatCompletionRequest),
    )
    async def chat(request: Request) -> Response:
        """The next assistant message of a conversation, through the model's chat template."""
        body = await parse(request, ChatCompletionRequest, gw.settings.max_request_bytes)
        _model(gw, body.model)
        codec = _codec(gw)
        if codec.chat is None:
            raise InvalidRequest(
                f"model {gw.model_name!r} has no chat template (no `chat_template` in its "
                "tokenizer_config.json, no chat_template.jinja); use /v1/completions with "
                "the prompt formatted yourself"
            )
        # copying the messages and rendering them is Python code, which in a worker
        # thread yields the GIL to the event loop every few ms: a long conversation
        # does not hold up other requests (the body's size and structure are bounded
        # before it is parsed: `requests.read_body`)
        text = await asyncio.to_thread(render_chat, codec.chat, body)
        ids = await gw.encode(text, add_special_tokens=False, field="messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as much as the context and the limit leave
            room = gw.engine.max_context - len(ids) + 1
            max_tokens = max(1, min(gw.settings.max_new_tokens_limit, room))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = _sampling(body, logprobs)
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        run = await start(
            gw,
            codec,
            [ids],
            max_tokens,
            sampling,
            body.n,
            body.stops(),
            field=field,
            prompt_field="messages",
        )
        chunks = ChatChunks(gw, int(time.time()), body)
        if body.stream:
            events = stream(run, chunks, body.include_usage())
            return StreamingResponse(events, media_type="text/event-stream")
        return await whole(run, chunks.whole, request.is_disconnected)

    return api


__all__ = ["ChatChunks", "CompletionChunks", "router", "template_messages"]
