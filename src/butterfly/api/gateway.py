"""What both APIs share: turning checked input into a task, and a task into a response.

Every check that depends on the model (context length, vocabulary, input kind) happens
here, before the task is accepted, so bad input is a 400 at the door rather than a task
that fails later; and a 202 always names a task the engine can run.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi.responses import JSONResponse, Response

from butterfly.api.errors import KIND_STATUS, ContextExceeded, InvalidField, error_response
from butterfly.api.settings import ApiSettings
from butterfly.runtime.stage import cannot_generate
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.engine import Engine
from butterfly.schedule.scheduler import Scheduler, TaskSnapshot
from butterfly.schedule.state import TaskStatus
from butterfly.types.errors import ButterflyError, InvalidRequest, PayloadTooLarge
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask, SamplingParams
from butterfly.types.wire.agreement import Proof, decode

log = logging.getLogger(__name__)

WATCH_S = 0.1
"""How often a wait for a whole answer looks whether its client is still there."""
CLIENT_GONE = 499
"""The status (nginx's) a whole answer ends with when its client hung up: nobody reads it."""
INLINE_TOKENIZE_BYTES = 256
"""Prompts up to this size are tokenized on the event loop. Measured with the demo
tokenizer (Intel Xeon, idle): 5 us for 10 bytes, 170 us for 1,000, so about 0.17 us a
byte, against 38 us for the hand-off to a worker thread and back (`asyncio.to_thread`,
more on a loaded machine, where each wake-up waits for a core): below ~250 bytes the
hand-off costs more than the work it moves off the loop."""


@dataclass
class Gateway:
    """What the routes share; `settings` is replaced whole when the config changes
    (butterfly.api.live), so a request reads one consistent set of limits."""

    scheduler: Scheduler
    engine: Engine
    codec: TextCodec | None
    settings: ApiSettings
    model_name: str

    # --- input -------------------------------------------------------------------------

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes any one vocabulary entry spells (0 without a tokenizer)."""
        if self.codec is None:
            return 0
        vocab = self.codec.tokenizer.get_vocab(with_added_tokens=True)
        return max((len(t.encode()) for t in vocab), default=1)

    def prompt_limit(self) -> int:
        """The longest prompt text, in UTF-8 bytes, worth tokenizing: `api.max_prompt_bytes`,
        or by default what the context could hold if every token were the vocabulary's
        longest (a byte-level BPE token spells at most that many of the prompt's bytes, so
        a longer prompt cannot fit; a tokenizer that drops text, e.g. whitespace, may
        need the option set)."""
        return self.settings.max_prompt_bytes or self.engine.max_context * max(
            1, self.longest_token_bytes
        )

    async def encode(
        self, prompt: str, *, add_special_tokens: bool = True, field: str = "prompt"
    ) -> list[int]:
        """The prompt's token ids; too long a prompt is refused before it is tokenized,
        and tokenizing runs in a worker thread: a multi-megabyte prompt took seconds, all
        of them on the event loop, where the node's heartbeats and every other request
        waited; a short one is tokenized inline (`INLINE_TOKENIZE_BYTES`). A rendered chat
        template holds its special tokens already (`add_special_tokens=False`)."""
        if self.codec is None:
            raise InvalidRequest("this model has no tokenizer; send `input_ids` instead of text")
        limit, size = self.prompt_limit(), len(prompt.encode("utf-8", "surrogatepass"))
        if size > limit and self.settings.max_prompt_bytes:  # the operator's limit: 413
            raise PayloadTooLarge(
                f"the prompt is {size} bytes; this gateway tokenizes at most {limit} bytes "
                "(api.max_prompt_bytes): shorten it"
            )
        if size > limit:  # more than the context could hold, whatever its tokens
            raise ContextExceeded(
                f"the prompt is {size} bytes; the model's context of "
                f"{self.engine.max_context} tokens of at most {self.longest_token_bytes} bytes "
                f"each holds at most {limit} bytes: shorten it",
                field,
            )
        if size <= INLINE_TOKENIZE_BYTES:
            return tokenize(self.codec, prompt, add_special_tokens)
        return await asyncio.to_thread(tokenize, self.codec, prompt, add_special_tokens)

    def token_task(
        self,
        ids: list[int],
        max_new_tokens: int | None,
        sampling: SamplingParams,
        priority: int = 0,
        stop: tuple[str, ...] = (),
        *,
        fewest: int = 1,
        field: str = "max_new_tokens",
        prompt_field: str = "prompt",
    ) -> InferenceTask:
        """`fewest`: the least `max_new_tokens` allowed (0 for an echo that only scores
        its prompt); `field`: the request's own name for it, in an error; `prompt_field`:
        the request's name for its prompt, in an error that it is beyond the context."""
        if self.engine.input_kind != "tokens":
            raise InvalidRequest("this model takes an input vector; send `input`, not tokens")
        if not self.engine.generates:
            raise InvalidRequest(cannot_generate(self.model_name))
        if not ids:
            raise InvalidRequest("the prompt is empty: give at least one token")
        context, limit = self.engine.max_context, self.settings.max_new_tokens_limit
        # before the vocabulary scan, so a huge list is refused at once; a prompt of
        # exactly `context` tokens fits (it is scored, or gives one new token, from
        # `context` positions: the check after max_new_tokens below says how many more);
        # refused here before, whatever max_new_tokens, it kept evaluation harnesses'
        # full windows (echo, max_tokens 0) out (a review)
        if len(ids) > context:
            raise ContextExceeded(
                f"the prompt is {len(ids)} tokens long; the model's context is {context} tokens",
                prompt_field,
            )
        if self.codec is not None:
            vocab = self.codec.vocab
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InvalidField(
                    f"{prompt_field}: token ids must lie in [0, {vocab}); got {bad[0]}"
                    + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""),
                    prompt_field,
                )
            biased = [t for t, _ in sampling.logit_bias if t >= vocab]
            if biased:  # else the engine would fail mid-request, at its first choice
                raise InvalidField(
                    f"logit_bias names token {biased[0]}, outside the vocabulary of {vocab} "
                    "tokens" + (f" (and {len(biased) - 1} more)" if len(biased) > 1 else ""),
                    "logit_bias",
                )
        if max_new_tokens is None:  # the default, shrunk to what the context leaves room for
            max_new_tokens = min(self.settings.default_max_new_tokens, context - len(ids) + 1)
        if not fewest <= max_new_tokens <= limit:
            raise InvalidField(
                f"{field} must be between {fewest} and {limit}, got {max_new_tokens}", field
            )
        if len(ids) + max_new_tokens - 1 > context:
            raise ContextExceeded(
                f"the prompt of {len(ids)} tokens plus {field} {max_new_tokens} needs "
                f"{len(ids) + max_new_tokens - 1} positions; the model's context is {context} "
                f"(ask for at most {context - len(ids) + 1} new tokens)",
                prompt_field,
            )
        return InferenceTask(
            task_id=new_task_id(),
            input_ids=tuple(ids),
            max_new_tokens=max_new_tokens,
            stop=stop,
            sampling=sampling,
            priority=priority,
            created_at=time.time(),
        )

    def vector_task(self, vector: list[float], priority: int = 0) -> InferenceTask:
        if self.engine.input_kind != "vectors":
            raise InvalidRequest(
                "this model takes tokens, not an input vector; send `prompt` or `input_ids`"
            )
        if not vector:
            raise InvalidRequest("the input vector is empty")
        return InferenceTask(
            task_id=new_task_id(),
            input_vector=tuple(vector),
            max_new_tokens=1,
            priority=priority,
            created_at=time.time(),
        )

    def wait_limit(self, requested: float) -> float:
        """`GET /result`'s `wait`, capped at `max_wait_s`; a negative or NaN one is a 400
        whose `param` names `wait`, as a non-numeric one's does (it named none)."""
        if not requested >= 0:  # also refuses NaN
            raise InvalidField(f"wait must be a number of seconds >= 0, got {requested}", "wait")
        return min(requested, self.settings.max_wait_s)

    # --- output ------------------------------------------------------------------------

    def finish_reason(self, output_ids: tuple[int, ...]) -> str:
        """OpenAI's `finish_reason`: "stop" at an end-of-sequence token, else "length"."""
        stops = self.codec.eos_ids if self.codec is not None else frozenset()
        return "stop" if output_ids and output_ids[-1] in stops else "length"

    def failure(self, snap: TaskSnapshot) -> JSONResponse:
        """The error response of a task that failed or was cancelled."""
        task_id, state = snap.task.task_id, snap.state
        extra = {"task_id": task_id, "status": state.status.value}
        retry = self.settings.retry_after_s
        if state.status is TaskStatus.CANCELLED:
            message = f"task {task_id} was cancelled"
            return error_response(409, "task_cancelled", message, retry_after_s=retry, extra=extra)
        kind = state.error_type or "internal_error"
        status = KIND_STATUS.get(kind, 500)
        return error_response(status, kind, state.reason, retry_after_s=retry, extra=extra)

    async def waited(self, task_id: RequestId, gone: Callable[[], Awaitable[bool]]) -> Response:
        """`POST /inference`'s `wait: true`: the result once ready, or 202 with the task's
        id after `max_wait_s`. A client that hangs up meanwhile has its task cancelled
        (499, read by nobody), as the OpenAI routes' whole answers are: it never learned
        the id, so the task ran to its end for no one, and a retry ran beside it. Not once
        the scheduler has stopped (the role handed on, the node stopping): its tasks stay
        queued for the next gateway, and its `wait` returns at once (202)."""
        deadline = time.monotonic() + self.settings.max_wait_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            snap = await self.scheduler.wait(task_id, min(WATCH_S, left))
            if snap.state.terminal or not self.scheduler.serving or left <= WATCH_S:
                return self.outcome(snap)
            if await gone():
                with anyio.CancelScope(shield=True):
                    await cancel_quietly(self.scheduler, task_id)
                return Response(status_code=CLIENT_GONE)

    def outcome(self, snap: TaskSnapshot, *, proofs: bool = False) -> JSONResponse:
        """200 with the result, 202 while unfinished, or the task's error."""
        status = snap.state.status
        if status is TaskStatus.COMPLETED:
            body = result_body(snap)
            if proofs and snap.result is not None:
                body["proofs"] = [proof_body(p) for p in snap.result.proofs]
            return JSONResponse(body)
        if status.terminal:
            return self.failure(snap)
        return JSONResponse(accepted_body(snap), status_code=202)


async def cancel_quietly(scheduler: Scheduler, task_id: RequestId) -> None:
    """Cancel a task nobody waits for any more; never raises (one cancel's failure must
    not leave a request's other tasks running unawaited)."""
    try:
        await scheduler.cancel(task_id)
    except ButterflyError:
        pass  # it finished, or no standby took it
    except Exception:
        log.exception("cancelling task %s, whose client went away, failed", task_id)


def tokenize(codec: TextCodec, text: str, add_special_tokens: bool = True) -> list[int]:
    """`codec.encode`, through the batch call: the tokenizers library lets go of the GIL
    only in its batch calls, so in a worker thread this one leaves the event loop
    running (a single `encode` holds the GIL to the end and stalls the loop anyway)."""
    batch = codec.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
    return list(batch[0].ids)


def new_task_id() -> RequestId:
    return RequestId(uuid.uuid4().hex)


def accepted_body(snap: TaskSnapshot) -> dict[str, Any]:
    return {"task_id": snap.task.task_id, "status": snap.state.status.value}


def status_body(snap: TaskSnapshot) -> dict[str, Any]:
    body = accepted_body(snap)
    body["tokens_generated"] = snap.tokens_generated
    body["priority"] = snap.task.priority
    if snap.queue_position is not None:
        body["queue_position"] = snap.queue_position
    if snap.state.reason:
        body["reason"] = snap.state.reason
    return body


def proof_body(raw: bytes) -> dict[str, Any]:
    """One signed stage-step record: its fields, and the signed bytes themselves (base64)
    so a client can check the Ed25519 signature against the node's key on its own."""
    body: dict[str, Any] = {"record": base64.b64encode(raw).decode()}
    try:
        proof = decode(raw)
    except ButterflyError as e:
        return {**body, "error": str(e)}
    if not isinstance(proof, Proof):
        return {**body, "error": f"not a proof but {proof.kind}"}
    return {
        "node": int(proof.sender),
        "epoch": int(proof.epoch),
        "step": proof.step,
        "stage": int(proof.stage),
        "layers": [proof.layer_start, proof.layer_end],
        "input_hash": proof.input_hash.hex(),
        "output_hash": proof.output_hash.hex(),
        "merkle_root": proof.merkle_root.hex(),
        "signature": proof.signature.hex(),
        **body,
    }


def result_body(snap: TaskSnapshot) -> dict[str, Any]:
    body = accepted_body(snap)
    result = snap.result
    if result is None:
        return body
    body.update(
        output_ids=list(result.output_ids),
        text=result.text,
        verified=result.verified,
        stages=[{"node": s.node, "layers": [s.layers.start, s.layers.end]} for s in result.stages],
        timings=result.timings,
        prompt_tokens=len(snap.task.input_ids),
    )
    if result.output_vector:
        body["output_vector"] = list(result.output_vector)
    return body


__all__ = ["Gateway", "accepted_body", "result_body", "status_body", "tokenize"]
