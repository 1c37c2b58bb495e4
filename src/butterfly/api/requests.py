"""Request bodies: read within a size limit, then parsed into strict models.

Endpoints read the body themselves instead of letting FastAPI parse it, for two reasons:
the size limit must hold *before* a byte is parsed (a `Content-Length` over the limit is
refused unread, and a chunked body is cut off as soon as it passes the limit), and bad
input must get a 400 whose message names the problem (FastAPI's default is a 422 with a
list of pydantic errors).

Models are strict (`"5"` is not a number, `true` is not an integer), refuse unknown
fields (a misspelt `max_tokens` must not silently fall back to a default) and refuse
NaN and infinity.

A body's JSON structure is bounded before it is parsed (`MAX_JSON_NODES`): parsing builds
a Python object per array, object and member, holding the GIL throughout (a worker
thread would not help), and a 10 MiB chat message whose allowed extra field held
`[[[]], [[]], ...]` held the event loop for 2-4 s in parsing and copying it (a review).
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from butterfly.api.errors import InvalidField, describe_validation, first_field
from butterfly.types.errors import InvalidRequest, PayloadTooLarge

SEED_MAX = (1 << 63) - 1  # torch.Generator.manual_seed takes a 64-bit seed
PRIORITY_LIMIT = 1_000_000

Model = TypeVar("Model", bound=BaseModel)
GENERATION_FIELDS = frozenset({"max_new_tokens", "temperature", "top_k", "top_p", "seed"})
MAX_JSON_NODES = 100_000
"""Arrays, objects and object members (`[`, `{`, `:` outside strings) a body may hold:
about 0.1 s of parsing on a busy 2-core machine, where the 4 million of a 10 MiB body
took 3-4 s. A real request holds a few per message, prompt or tool; its size is in its
strings and token ids, which cost little each and are not counted."""


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class InferenceRequest(StrictBody):
    """`POST /inference`: exactly one of `prompt`, `input_ids`, `input`."""

    prompt: str | None = None
    input_ids: list[int] | None = None
    input: list[float] | None = None
    max_new_tokens: int | None = None  # range checked against the settings' limit
    temperature: Annotated[float, Field(ge=0.0)] = 0.0  # 0 = greedy
    top_k: Annotated[int, Field(ge=0)] = 0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    priority: Annotated[int, Field(ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT)] = 0
    wait: bool = False

    @model_validator(mode="after")
    def one_input(self) -> InferenceRequest:
        given = [k for k in ("prompt", "input_ids", "input") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `prompt`, `input_ids` or `input`"
                + (f" (got {', '.join(given)})" if given else "")
            )
        unused = sorted(self.model_fields_set & GENERATION_FIELDS) if self.input else []
        if unused:  # a vector model's one output: they were accepted and dropped
            raise ValueError(
                f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to "
                "`input` (a vector model computes one output vector, it generates no tokens)"
            )
        return self


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, or `PayloadTooLarge` as soon as it is known to exceed `limit`, or
    when it holds more than `MAX_JSON_NODES` (unparsed: that is the cost it bounds)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest(f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise PayloadTooLarge(f"the body is {int(declared)} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    nodes = json_nodes(body)
    if nodes > MAX_JSON_NODES:
        raise PayloadTooLarge(
            f"the body holds {nodes} JSON arrays, objects and members; the limit is "
            f"{MAX_JSON_NODES} (a request's size belongs in its strings and token ids)"
        )
    return body


def json_nodes(body: bytes) -> int:
    """The `[`, `{` and `:` of `body` outside its strings: exact when over
    `MAX_JSON_NODES` (at a few tens of ms for 10 MiB), else an upper bound counted in
    milliseconds, the text of a prompt included."""
    rough = body.count(b"[") + body.count(b"{") + body.count(b":")
    if rough <= MAX_JSON_NODES:
        return rough
    # escapes out first (left to right, as JSON reads them), so every quote left
    # opens or closes a string; the parity of the quotes before a byte says which side
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    octets = np.frombuffer(plain, dtype=np.uint8)
    inside = np.cumsum(octets == ord('"'), dtype=np.uint8) & 1  # wraps: parity survives
    structure = (octets == ord("[")) | (octets == ord("{")) | (octets == ord(":"))
    return int(np.count_nonzero(structure & (inside == 0)))


async def parse(request: Request, model: type[Model], limit: int) -> Model:
    """Read and validate a JSON body into `model`; `InvalidRequest` naming what is wrong."""
    body = await read_body(request, limit)
    if not body.strip():
        raise InvalidRequest("the body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:  # without the inputs: a large bad body made them costly
        errors = e.errors(include_url=False, include_input=False)
        message = describe_validation(errors, tuple(model.model_fields))
        raise InvalidField(message, first_field(errors)) from e


__all__ = [
    "MAX_JSON_NODES",
    "SEED_MAX",
    "InferenceRequest",
    "StrictBody",
    "json_nodes",
    "parse",
    "read_body",
]
