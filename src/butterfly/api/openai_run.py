"""Running the `n` choices of one OpenAI request, whole or as a stream of SSE chunks.

Each choice is its own task in the scheduler (same queue, limits and checks as any
request); choice `i` of a seeded request samples with `seed + i`, so a seeded request
with `n > 1` gives `n` different, reproducible answers. A batch of prompts (completions)
gives each its `n` choices in turn, seeded the same way: a prompt answers the same
whether it came alone or in a batch.

Stop strings travel with each task (`InferenceTask.stop`): the engine ends the generation
at the token whose text completes one, as at end of sequence, so neither a whole answer
nor a stream spends a step past it, and either is checked as any finished request is;
the choices cut their text at the same place (`openai_choices.ChoiceText`).

Streams send an SSE comment when no token came for `KEEPALIVE_S`, so proxies and clients
with read timeouts see a live connection through a long prefill or a queue; clients
ignore comments.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from typing import Any, Protocol

import anyio
from fastapi.responses import JSONResponse, Response

from butterfly.api.errors import InvalidField, error_body
from butterfly.api.gateway import CLIENT_GONE, WATCH_S, Gateway, cancel_quietly
from butterfly.api.openai_choices import ChoiceText, StopScanner
from butterfly.api.openai_schema import MAX_TASKS, Usage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.engine import PromptScored, Retraction, Streamed, Token
from butterfly.schedule.state import TaskStatus
from butterfly.types.errors import ButterflyError, ServiceUnavailable
from butterfly.types.ids import RequestId
from butterfly.types.tasks import SEED_SPAN, InferenceResult, InferenceTask, SamplingParams

KEEPALIVE_S = 15.0
KEEPALIVE = ": keep-alive\n\n"
HELD = ": held\n\n"
"""An SSE comment per token held back (`api.stream_verified_only`): clients ignore it,
and the connection shows progress instead of looking idle to proxies."""

log = logging.getLogger(__name__)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


@dataclass
class Run:
    """The tasks of one request and the text each has produced."""

    gw: Gateway
    tasks: list[InferenceTask]
    choices: list[ChoiceText]
    prompts: list[list[int]]
    passed_over: int = 0  # tokens of candidates `best_of` did not return
    ids_told: bool = False  # a stream's first chunk named every choice's task

    def task_ids(self) -> list[str] | None:
        """Every choice's task id, in choice order, for a stream's first chunk only and
        only where there are several: the chunks' `id` names the first choice's task,
        and after a broken stream each choice's text is read by its own id (`GET
        /result/<id>`); with n = 2 the second was lost to the client (a review)."""
        if self.ids_told or len(self.tasks) < 2:
            return None
        self.ids_told = True
        return [str(t.task_id) for t in self.tasks]

    def usage(self) -> Usage:
        """Each prompt counted once, whatever its `n`, as OpenAI counts them; every
        candidate's tokens counted, returned or not (`best_of`), as OpenAI bills them."""
        done = sum(len(c.tokens) for c in self.choices) + self.passed_over
        read = sum(len(p) for p in self.prompts)
        return Usage(prompt_tokens=read, completion_tokens=done, total_tokens=read + done)

    def keep_best(self, n: int) -> list[int]:
        """Keep each prompt's `n` best choices, best first and numbered anew (OpenAI's
        `best_of`: the highest log-probability per token); the indexes kept."""
        per = len(self.choices) // len(self.prompts)
        kept: list[int] = []
        for p in range(len(self.prompts)):
            group = range(p * per, (p + 1) * per)
            kept += sorted(group, key=lambda i: -mean_logprob(self.choices[i]))[:n]
        self.passed_over += sum(len(c.tokens) for i, c in enumerate(self.choices) if i not in kept)
        self.choices = [self.choices[i] for i in kept]
        for index, choice in enumerate(self.choices):
            choice.index = index
        return kept

    async def cancel_unfinished(self, keep: Collection[int] = ()) -> None:
        """Cancel every task but those at the indexes in `keep` (ended, or handed out).
        Not once the scheduler has stopped (the role handed on, or the node stopping):
        its unfinished tasks must stay queued in the store for the gateway that runs them
        next, and a cancel then would write them "cancelled" there. All at once: each
        waits for a standby to take its end (`wiring.standby.COPY_TIMEOUT_S`, 5 s), and one after
        another the 64 tasks of one request held it up to 320 s (a review)."""
        if not self.gw.scheduler.serving:
            return
        ids = [task.task_id for index, task in enumerate(self.tasks) if index not in keep]
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*(cancel_quietly(self.gw.scheduler, task_id) for task_id in ids))


async def start(
    gw: Gateway,
    codec: TextCodec,
    prompts: list[list[int]],
    max_tokens: int | None,
    sampling: SamplingParams,
    n: int,
    stops: tuple[str, ...],
    *,
    fewest: int = 1,
    field: str = "max_tokens",
    prompt_field: str = "prompt",
    per_prompt: str = "n",
) -> Run:
    """Submit `n` tasks per prompt (all or none: a refused one cancels the others);
    `fewest`: the least `max_tokens` allowed, `field` the request's name for it
    (`Gateway.token_task`); `per_prompt`: the request's name for `n` (`best_of`, when
    the tasks are its candidates)."""
    if len(prompts) * n > MAX_TASKS:
        raise InvalidField(
            f"{len(prompts)} prompts x {per_prompt}={n} is {len(prompts) * n} completions; "
            f"one request may ask for at most {MAX_TASKS}: split the batch",
            per_prompt,
        )
    tasks: list[InferenceTask] = []
    choices: list[ChoiceText] = []
    for ids in prompts:
        for i in range(n):
            seed = None if sampling.seed is None else (sampling.seed + i) % SEED_SPAN
            seeded = replace(sampling, seed=seed)
            tasks.append(
                gw.token_task(
                    ids,
                    max_tokens,
                    seeded,
                    stop=stops,
                    fewest=fewest,
                    field=field,
                    prompt_field=prompt_field,
                )
            )
            index = len(choices)
            choices.append(
                ChoiceText(index, codec.tokenizer, StopScanner(stops), codec.eos_ids, ids)
            )
    run = Run(gw, [], choices, prompts)
    try:
        for task in tasks:
            await gw.scheduler.submit(task)
            run.tasks.append(task)
    except BaseException:
        await run.cancel_unfinished()
        raise
    return run


def feed(choice: ChoiceText, result: InferenceResult) -> None:
    """A finished task's tokens into its choice, as if streamed."""
    scored = len(result.logprobs) == len(result.output_ids)
    tokens: tuple[Token, ...] = result.logprobs if scored else result.output_ids
    for token in tokens:
        choice.push(token)
    choice.end("length")
    choice.prompt_scored = result.prompt_logprobs


def mean_logprob(choice: ChoiceText) -> float:
    """The mean log-probability of a choice's tokens; a choice without scores (resumed
    from a dead gateway's checkpoint: its tokens carry none) ranks last."""
    values = [s.logprob for s in choice.scored if s is not None]
    return sum(values) / len(values) if values else -math.inf


def weakest(verified: list[str]) -> str:
    """One `verified` for several choices: theirs if they agree, else "none"."""
    return verified[0] if len(set(verified)) == 1 else "none"


Whole = Callable[[Run, str], dict[str, Any]]


async def whole(
    run: Run, answer: Whole, gone: Callable[[], Awaitable[bool]], best: int | None = None
) -> Response:
    """Wait for every choice; the answer built by `answer(run, verified)`, or the first
    choice's failure (the others are cancelled). An OpenAI client reads 200 or an error
    only, so the wait has no limit of its own (a 202 after `api` settings' `max_wait_s`
    was read as an empty success); the client's timeout ends it instead: once `gone()`
    says the client hung up, every choice is cancelled, as a stream's are (they ran to
    the end, and the client's retries each ran theirs beside them). A scheduler that
    stopped under the wait (the role handed on, the node stopping) ends it too, with a
    503 as a stream's `_ended` gives: its `wait` then returns at once, unfinished, and
    looping on it spun the event loop until the client hung up (a review). `best`: each
    prompt's choices are candidates, of which this many are returned (`Run.keep_best`)."""
    gw, verified = run.gw, []
    for task, choice in zip(run.tasks, run.choices, strict=True):
        snap = await gw.scheduler.wait(task.task_id, WATCH_S)
        while not snap.state.terminal:
            if not gw.scheduler.serving:  # its tasks stay queued for the next gateway
                raise ServiceUnavailable(shutting_down(task.task_id))
            if await gone():
                log.info("client of %s hung up: cancelling its tasks", run.tasks[0].task_id)
                await run.cancel_unfinished(())
                return Response(status_code=CLIENT_GONE)
            snap = await gw.scheduler.wait(task.task_id, WATCH_S)
        if snap.state.status is not TaskStatus.COMPLETED or snap.result is None:
            await run.cancel_unfinished(())  # an error: the other choices are cancelled
            return gw.outcome(snap)
        feed(choice, snap.result)
        verified.append(snap.result.verified)
    if best is not None:
        verified = [verified[i] for i in run.keep_best(best)]
    return JSONResponse(answer(run, weakest(verified)))


class Chunks(Protocol):
    """How one API shapes its stream (completions and chat differ)."""

    scores_prompt: bool
    """Whether the opening chunk carries the prompt's logprobs (an echo with logprobs):
    it then waits for them."""

    def opening(self, run: Run, index: int) -> dict[str, Any] | None:
        """A chunk before any token (chat's `role`, completions' echoed prompt)."""

    def delta(self, run: Run, choice: ChoiceText, text: str) -> dict[str, Any]:
        """New text of one choice, with the logprobs of the tokens it came from."""

    def last(self, run: Run, choice: ChoiceText, text: str, verified: str) -> dict[str, Any]:
        """A choice's last text, its `finish_reason` and which check it passed."""

    def retraction(self, run: Run, index: int, reason: str) -> dict[str, Any]:
        """Withdraws all of a choice's text so far (a chunk with a `retract` object)."""

    def usage(self, run: Run) -> dict[str, Any]:
        """`stream_options.include_usage`: the chunk with usage and no choices."""


async def _pump(
    gw: Gateway, index: int, task_id: RequestId, inbox: asyncio.Queue[tuple[int, Any]]
) -> None:
    """Feed one choice's tokens to its stream, then None at their end, or the error that
    broke the feed (the task's state read from a store that failed, say): a pump that
    died silently left its stream sending keep-alives forever, never an error nor
    `[DONE]` (a review)."""
    try:
        async for token in gw.scheduler.stream(task_id):
            await inbox.put((index, token))
    except Exception as e:
        log.exception("the token feed of task %s broke", task_id)
        await inbox.put((index, e))
        return
    await inbox.put((index, None))


async def stream(
    run: Run, chunks: Chunks, include_usage: bool, keepalive_s: float = KEEPALIVE_S
) -> AsyncIterator[str]:
    """The choices' text as SSE chunks, merged as they come; `[DONE]` at the end."""
    gw, hold = run.gw, run.gw.settings.stream_verified_only
    inbox: asyncio.Queue[tuple[int, Streamed | Exception | None]] = asyncio.Queue()
    pumps = [asyncio.create_task(_pump(gw, i, t.task_id, inbox)) for i, t in enumerate(run.tasks)]
    ended: set[int] = set()
    opened: set[int] = set()

    def opening(index: int) -> list[str]:
        """The choice's opening chunk, unless it went out already."""
        if index in opened:
            return []
        opened.add(index)
        body = chunks.opening(run, index)
        return [] if body is None else [sse(body)]

    try:
        # an echo with logprobs opens once its prompt is scored (the scores come before
        # the first token), or, when held for the check, with the checked result
        for i in range(len(run.tasks)) if not chunks.scores_prompt else ():
            for message in opening(i):
                yield message
        while len(ended) < len(run.tasks):
            try:
                index, item = await asyncio.wait_for(inbox.get(), keepalive_s)
            except TimeoutError:
                yield KEEPALIVE
                continue
            choice, task_id = run.choices[index], run.tasks[index].task_id
            if item is None or isinstance(item, Exception):
                ended.add(index)  # a broken feed's task is left to run: its error names it
                if item is None:
                    message, failed = await _ended(run, chunks, choice, task_id, hold)
                else:
                    message, failed = sse(_unfollowed(task_id, item)), True
                for early in opening(index):  # (held: `_ended` read the prompt's scores)
                    yield early
                yield message
                if failed:  # one error ends the stream; the other choices are cancelled
                    break
            elif isinstance(item, PromptScored):
                choice.prompt_scored = item.scores
                for message in [] if hold else opening(index):
                    yield message
            elif hold:  # nothing was sent, so a retraction has nothing to withdraw
                if not isinstance(item, Retraction):
                    yield HELD
            elif isinstance(item, Retraction):
                choice.reset()
                yield sse(chunks.retraction(run, index, item.reason))
                opened.discard(index)  # the echo is part of what it withdrew: again
                for message in [] if chunks.scores_prompt else opening(index):
                    yield message
            elif choice.finish is None:
                for message in opening(index):  # a one-token prompt has no scores
                    yield message
                if text := choice.push(item):
                    # logprobs wait for their text, if held; at a stop string the engine
                    # ends the task itself, so nothing here cancels it
                    yield sse(chunks.delta(run, choice, text))
        if include_usage and len(ended) == len(run.tasks):
            yield sse(chunks.usage(run))
        yield sse("[DONE]")
    finally:
        for pump in pumps:
            pump.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*pumps, return_exceptions=True)
        # The client went away mid-stream: stop the work it asked for (not when the
        # gateway is stopping: `cancel_unfinished` then leaves them queued).
        await run.cancel_unfinished(ended)


async def _ended(
    run: Run, chunks: Chunks, choice: ChoiceText, task_id: RequestId, hold: bool
) -> tuple[str, bool]:
    """The SSE message for a choice whose task ended (its last chunk, or an error), and
    whether it failed."""
    try:
        snap = await run.gw.scheduler.snapshot(task_id)
    except Exception as e:  # the store could not be read: still an error in the contract's shape
        log.exception("could not read the end of task %s", task_id)
        return sse(_unfollowed(task_id, e)), True
    status = snap.state.status
    if status is TaskStatus.COMPLETED and snap.result is not None:
        if hold:  # all of it now, checked
            feed(choice, snap.result)
            text = choice.emitted
        else:
            text = choice.end("length")
        return sse(chunks.last(run, choice, text, snap.result.verified)), False
    if snap.state.terminal:
        kind = snap.state.error_type or "task_cancelled"
        reason = snap.state.reason or f"task {task_id} was cancelled"
        return sse(error_body(kind, reason)), True
    return sse(error_body("service_unavailable", shutting_down(task_id))), True


def _unfollowed(task_id: RequestId, error: Exception) -> dict[str, Any]:
    """The error body of a choice whose tokens or end the gateway could not read: the
    task itself may well finish, so the body names where its result is read."""
    if isinstance(error, ButterflyError):
        kind, what = error.kind, error.message
    else:
        kind, what = "internal_error", f"{type(error).__name__}: {error}"
    message = f"the gateway could not follow task {task_id} ({what}); read /result/{task_id}"
    return error_body(kind, message)


def shutting_down(task_id: RequestId) -> str:
    """The message of a request whose gateway stopped serving before its task ended."""
    return f"the gateway is shutting down; read /result/{task_id} once it is back"


__all__ = ["HELD", "KEEPALIVE", "Chunks", "Run", "sse", "start", "stream", "whole"]
