"""The OpenAI-compatible API's request and response bodies, as pydantic models.

Requests are parsed with these models (`butterfly.api.requests.parse`) and responses are
built from them, so the OpenAPI document (`/openapi.json`) describes exactly what the
routes accept and answer; `tests/test_api_schema.py` fuzzes the routes against it.

Fields are in three groups. Acted on: the sampling and shaping fields below. Accepted and
ignored (`IGNORED`): fields SDKs such as LangChain and the official client send by
default, or that need features Butterfly does not have (tools, structured output);
refusing them broke those clients, and each is listed in the README. Anything else
is refused with a 400 naming the field, so a misspelt `max_tokens` cannot silently fall
back to a default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from butterfly.api.requests import SEED_MAX, StrictBody
from butterfly.runtime.chat import RESERVED_TEMPLATE_VARIABLES

MAX_CHOICES = 16  # `n`: completions per request
MAX_PROMPTS = 32  # prompts in one completions request (LangChain batches 20 by default)
MAX_TASKS = 64  # prompts x n: the tasks one request may queue
MAX_LOGPROBS = 20  # OpenAI's bound on `logprobs` / `top_logprobs`
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; vLLM more)
MAX_BEST_OF = 20  # candidates per prompt (OpenAI's bound)
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's bound)

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# OpenAI's seed is any 64-bit integer (vLLM takes negative ones too); the sampler's
# generator takes 0..2^63-1, so a negative seed is folded into it (`openai._sampling`)
Seed = Annotated[int, Field(ge=-SEED_MAX - 1, le=SEED_MAX)]
StopString = Annotated[str, Field(min_length=1, max_length=256)]
# OpenAI's logit_bias: token ids (as JSON keys, so strings; no sign or leading zero, so two
# keys never name one token) to a value added to that token's logit before each choice
BiasedToken = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,9})$")]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
LogitBias = Annotated[dict[BiasedToken, Bias], Field(max_length=MAX_LOGIT_BIAS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)]

IGNORED = (
    "suffix",
    "service_tier",
    "store",
    "metadata",
    "parallel_tool_calls",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
)
"""Request fields accepted and not acted on (docs: README, "OpenAI compatibility")."""


class StreamOptions(StrictBody):
    include_usage: bool = False  # a last chunk with `usage` and no choices
    # accepted and ignored: OpenAI's random padding of chunks against length side
    # channels, which a stream from a local cluster does not need
    include_obfuscation: bool | None = None


NULL_MEANS_DEFAULT = frozenset(
    {"temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "stream", "echo"}
    | {"logprobs", "top_k", "max_tokens"}
)
"""Fields OpenAI's spec makes nullable, whose null the official client sends for any
argument passed as None (`temperature=cfg.get("temperature")`): null is the field's
default, as OpenAI's own server takes it (a completion's `max_tokens: null` is 16 tokens,
where it was the gateway's own default, 64). (The other fields typed `... | None` take
null as themselves: `seed`, `stop`, ...)"""


class SamplingFields(StrictBody):
    """What both routes share."""

    @model_validator(mode="before")
    @classmethod
    def nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in NULL_MEANS_DEFAULT}
        return data

    model: str
    temperature: Temperature = 1.0  # OpenAI's default; 0 = greedy
    top_p: TopP = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # an extension, as in vLLM; 0 = off
    seed: Seed | None = None  # choice i of n samples with seed + i
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: Stop | None = None  # the text ends before the first stop string it contains
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias | None = None  # token ids in the tokenizer's vocabulary
    user: str | None = None  # accepted; logged nowhere, used for nothing
    # accepted and ignored (IGNORED):
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def biases(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as `SamplingParams.logit_bias` holds it: ids increasing."""
        return tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items()))

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @field_validator("stream_options")
    @classmethod
    def options_of_a_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        """OpenAI refuses them without a stream: they would be silently of no use. A
        field's check (`stream` comes before it), so that the error's `param` names it."""
        if value is not None and not info.data.get("stream", False):
            raise ValueError("stream_options is only allowed when stream is true")
        return value


PromptText = Annotated[str, Field(min_length=1)]
PromptIds = Annotated[list[int], Field(min_length=1)]
Batch = Field(min_length=1, max_length=MAX_PROMPTS)


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`. `prompt` takes OpenAI's four forms: a text, token ids, or
    a batch of either (LangChain's completion model sends every call as a list of texts);
    a batch of k prompts answers k x n choices, prompt i's at indexes i*n to i*n+n-1."""

    prompt: (
        PromptText
        | PromptIds
        | Annotated[list[PromptText], Batch]
        | Annotated[list[PromptIds], Batch]
    )
    # None = what the context leaves; 0 (with `echo` only) scores the prompt, no new token
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False  # the prompt's text before the completion
    # candidates per prompt, of which the n likeliest per token are returned (not streamed)
    best_of: Annotated[int, Field(ge=1, le=MAX_BEST_OF)] | None = None
    suffix: str | None = None  # ignored

    @field_validator("best_of")
    @classmethod
    def best_of_at_least_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        """OpenAI's rule: best_of picks n of best_of samples, so fewer cannot be asked
        (a field's check, so the error's `param` names it)."""
        n = info.data.get("n", 1)
        if best_of is not None and best_of < n:
            raise ValueError(f"best_of ({best_of}) must be at least n ({n})")
        return best_of

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts (one for a single text or a single list of ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        items: list[Any] = list(self.prompt)
        return [items] if isinstance(items[0], int) else items


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; fields beyond these (tool calls, names, refusals) are handed to the
    chat template as they came, as transformers does."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, frozen=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def text_only(cls, value: Any) -> Any:
        """Images, audio and files would be dropped silently otherwise: say so instead."""
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(
                        f"content parts must be text (this model reads text only); got {kind!r}"
                    )
        return value


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # deprecated by OpenAI, still sent
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True  # an extension, as in vLLM
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables (vLLM's)
    # accepted and ignored (IGNORED):
    parallel_tool_calls: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("top_logprobs")
    @classmethod
    def top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        """OpenAI and vLLM refuse it too: asked for alternatives without `logprobs`, a
        client would silently get none (`param` names it: `logprobs` comes before)."""
        if value is not None and not info.data.get("logprobs", False):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def template_variables(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """The variables the gateway itself gives the template may not be set again
        (the render failed with Python's own "multiple values" text: a review)."""
        taken = sorted(set(value or {}) & set(RESERVED_TEMPLATE_VARIABLES))
        if taken:
            raise ValueError(
                f"{', '.join(taken)} cannot be set: the gateway gives the template "
                f"{', '.join(RESERVED_TEMPLATE_VARIABLES)} itself"
            )
        return value


# --- responses ---------------------------------------------------------------------------

Finish = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The completions API's (legacy) logprobs: parallel lists, one entry per token;
    under `echo` the prompt's tokens come first, the first with `null` logprobs."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Finish | None = None


class Completion(BaseModel):
    """A completion, or (`stream: true`) one SSE chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    verified: str | None = None  # an extension: "none", "audit" or "replicate"
    # an extension, on a stream's first chunk where it has several choices: each one's
    # task id, in choice order (`GET /result/<id>` after a broken stream)
    task_ids: list[str] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Finish | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    verified: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Finish | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE chunk of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    verified: str | None = None
    task_ids: list[str] | None = None  # as `Completion.task_ids`


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, on every route (`butterfly.api.errors`)."""

    model_config = ConfigDict(extra="allow")  # some errors add top-level context
    error: ErrorDetail


class Accepted(BaseModel):
    """202: the answer was not ready within the call's wait (at most 300 s,
    `ApiSettings.max_wait_s`; `api.request_timeout_s` takes only its default); its
    result is at `GET /result/{task_id}`."""

    model_config = ConfigDict(extra="allow")
    task_id: str
    status: str


__all__ = [
    "IGNORED",
    "MAX_CHOICES",
    "MAX_PROMPTS",
    "MAX_TASKS",
    "Accepted",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionRequest",
    "ErrorResponse",
    "Finish",
    "ModelList",
]
