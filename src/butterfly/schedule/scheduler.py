"""Accepts tasks, keeps them safe, and runs up to `max_concurrent` of them on an engine.

The scheduler decides *when* a task runs (queue policy, concurrency limit); the engine
decides *where*. Its promises, in the order a task meets them:

- `submit` returns only after the task is committed to the store (and copied to the
  standby gateways, `on_accepted`), so an id handed to a client always names a task that
  will run, even across a gateway restart or the gateway's death; a sampled task is
  stored with a seed (drawn if it named none), so every run of it draws the same tokens;
- the queue is bounded, and a refused task (`QueueFull`) was never written;
- a finished task's state (and result) is committed before anyone waiting is woken; one
  the store refuses (the disk full) is kept, written with a later commit, and never
  shown unfinished again (`unstored`);
- `cancel` of a queued task removes it; of a running one, cancels the engine's call,
  which frees the task's state on every node; it returns only after the end is committed
  (and given to the standby gateways, `on_cancelled`), so a gateway taking over does not
  run a task its client was told is cancelled;
- `shutdown` stops dispatching, gives running tasks a grace period, then cancels them
  *without* marking them cancelled: they stay unfinished in the store and run again
  when the gateway comes back.

Concurrency: `run()` owns one TaskGroup holding the dispatch loop's tasks; every engine
call is a child of it, so nothing outlives `run()` and nothing is fire-and-forget. All
state is touched on the event loop only; store writes are made inline on the loop, the
writes of one loop turn in one commit (`schedule.group_commit`), reads go to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from butterfly.metrics.events import (
    Emit,
    QueueDepth,
    TaskFinished,
    TaskOutcome,
    TaskSubmitted,
    TokenProduced,
)
from butterfly.metrics.events import discard as discard_events
from butterfly.metrics.logcontext import REQUEST_ID
from butterfly.schedule.engine import Engine, PromptScored, Retraction, Streamed
from butterfly.schedule.group_commit import GroupCommit
from butterfly.schedule.queue import QueuePolicy, TaskQueue
from butterfly.schedule.state import (
    DISPATCH,
    FINISH,
    SUBMITTED,
    Fail,
    Step,
    TaskEvent,
    TaskState,
    TaskStatus,
    apply,
    transition,
)
from butterfly.schedule.store import TaskStore
from butterfly.types.errors import (
    ButterflyError,
    InvalidTransition,
    QueueFull,
    ServiceUnavailable,
    TaskAlreadyExists,
    TaskNotFound,
    TaskNotHeld,
)
from butterfly.types.ids import RequestId
from butterfly.types.tasks import SEED_SPAN, InferenceResult, InferenceTask, Sampled

log = logging.getLogger(__name__)

RECENT_RESULTS = 128
"""Finished tasks kept in memory, so reading a fresh result does not touch the disk.
Each holds its result with the signed record of every stage and step (tens of KB for a
few dozen tokens): 1024 took half an hour or more of steady load to fill, growing the
gateway's memory all that time (bench/soak.py); a result is read fresh within seconds."""
RECENT_S = 60.0
"""And for at most this long after they finished: 128 results still took 8-9 minutes to
fill at the soak's 15 requests a minute (about 22 KB each, 2.6 MB, the acting gateway's
largest growth in tracemalloc snapshots), a slope a bounded cache should not make; by
age the cache holds a minute's results at any rate up to 128 a minute, full within that
minute. Older results are read from the store."""

CANCELLABLE = frozenset({TaskStatus.PARTITIONING, TaskStatus.COORDINATING, TaskStatus.COMPUTING})
"""Running states in which cancelling still saves work (later ones are about to finish)."""

OUTCOMES: dict[TaskStatus, TaskOutcome] = {
    TaskStatus.COMPLETED: "completed",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class TaskSnapshot:
    """A task as a reader sees it at one moment."""

    task: InferenceTask
    state: TaskState
    result: InferenceResult | None = None
    tokens_generated: int = 0
    queue_position: int | None = None  # tasks ahead of it, while queued


@dataclass(eq=False)
class _Live:
    """A task that has not finished yet, with everything waiting on it."""

    task: InferenceTask
    state: TaskState
    accepted: float
    # Set when the task finishes, or when the scheduler stops without finishing it (the
    # task then stays unfinished in the store): waiters must not outlive the scheduler.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: list[int] = field(default_factory=list)
    last_token_at: float = 0.0
    dispatched: float = 0.0
    subscribers: list[asyncio.Queue[Streamed | None]] = field(default_factory=list)
    prompt_scored: PromptScored | None = None  # the prompt's scores, once they came
    scored: list[Sampled] = field(default_factory=list)  # `tokens` with logprobs, if asked
    produced: bool = False  # a token came (a retraction empties `tokens`, not this)
    runner: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    finishing: bool = False  # a terminal state is being committed
    result: InferenceResult | None = None


def unstored(
    state: TaskState, result: InferenceResult | None, error: Exception
) -> tuple[TaskState, InferenceResult | None]:
    """The terminal state to report and keep when the store refused to record `state`.
    A result the store did not take is not handed out (it would not survive a restart):
    the task fails and its client submits it again. A cancel or a failure stays what it
    was. Either is written with a later commit (`GroupCommit.keep`) and read from memory
    till then; only a restart before that runs the task again."""
    if state.status is not TaskStatus.COMPLETED:
        return state, result
    reason = f"the result could not be stored ({error}); submit the task again"
    return TaskState(TaskStatus.FAILED, reason, "internal_error"), None


async def expire_finished(
    store: TaskStore,
    ttl_s: float,
    *,
    every_s: float = 60.0,
    forget: Callable[[list[str]], None] = lambda task_ids: None,
) -> None:
    """Forever: delete finished tasks (and their results) older than `ttl_s` from `store`,
    checking every `every_s` (at most a quarter of the TTL), and `forget` them. Run by
    the acting gateway's scheduler and by a standby on its copies (`wiring.gateway`):
    they are the same tasks, under the same retention (a standby kept them for good)."""
    every_s = min(every_s, ttl_s / 4)
    while True:
        pruned = await asyncio.to_thread(store.prune, time.time() - ttl_s)
        forget(pruned)
        if pruned:
            log.info("pruned %d task(s) finished over %.0f s ago", len(pruned), ttl_s)
        await asyncio.sleep(every_s)


def seeded(task: InferenceTask, draw: Callable[[], int]) -> InferenceTask:
    """`task` with a seed `draw`n for its sampling if it samples and named none, else as
    it is. Taken before the task is stored, so every run of it, on this gateway or on a
    standby that takes over, draws the same tokens: a run resumed without a checkpoint
    (the gateway died before its first) or repeated (it died after the task completed,
    before the end reached the standby) drew afresh, and the tokens a client had read
    were not those of the result (a review)."""
    sampling = task.sampling
    if sampling.greedy or sampling.seed is not None:
        return task
    return replace(task, sampling=replace(sampling, seed=draw() % SEED_SPAN))


def draw_seed() -> int:
    """A fresh seed for a request that named none: 63 random bits (`SEED_SPAN`)."""
    return secrets.randbits(63)


class Scheduler:
    def __init__(
        self,
        *,
        engine: Engine,
        store: TaskStore,
        emit: Emit = discard_events,
        max_concurrent: int = 4,
        queue_capacity: int = 256,
        policy: QueuePolicy = QueuePolicy.FIFO,
        detokenize: Callable[[Sequence[int], Sequence[int]], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_accepted: Callable[[InferenceTask], Awaitable[None]] | None = None,
        on_finished: Callable[[RequestId, TaskState, InferenceResult | None], None] | None = None,
        on_cancelled: Callable[[RequestId, TaskState], Awaitable[None]] | None = None,
        refusal: Callable[[], str | None] = lambda: None,
        draw: Callable[[], int] = draw_seed,
    ) -> None:
        """`on_accepted` runs after a task's commit and before `submit` returns (the copy
        to the standby gateways); `on_finished` after a terminal state's commit;
        `on_cancelled` after a cancel's commit and before `cancel` returns (the end given
        to the standbys, whose copy says the task is queued);
        `refusal`, before anything is written, says why no task may be accepted now
        (`ServiceUnavailable`: the client sends it elsewhere); `detokenize(prompt, ids)`,
        the text `ids` add to `prompt` (`TextCodec.continuation`); `draw`, the seed of a
        sampled task that names none (`seeded`)."""
        self._on_accepted, self._on_finished = on_accepted, on_finished
        self._on_cancelled = on_cancelled
        self._refusal, self._draw = refusal, draw
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self._engine, self._store, self._emit = engine, store, emit
        self._writes = GroupCommit(store)
        self._max_concurrent = max_concurrent
        self._detokenize = detokenize
        self._clock = clock
        self._queue = TaskQueue(queue_capacity, policy)
        self._live: dict[str, _Live] = {}
        # finished tasks, oldest first, with when they finished (`RECENT_S`)
        self._recent: OrderedDict[str, tuple[float, TaskSnapshot]] = OrderedDict()
        self._runners: set[str] = set()
        self._orphans: list[_Live] = []  # cancelled before their runner ever started
        self._reserved = 0  # submissions between the capacity check and the queue push
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._grace_s = 0.0
        self._grace_over = asyncio.Event()
        self._accepting = True
        self.serving = False  # True while run() dispatches
        for task in store.recovered:  # accepted before a restart: they may exceed the bound
            self._enqueue(task, force=True)
        if store.recovered:
            log.info("re-queued %d unfinished task(s) from %s", len(store.recovered), store.path)

    def retune(self, *, max_concurrent: int, queue_capacity: int, policy: QueuePolicy) -> None:
        """Changed scheduling.dispatch_batch_size, max_queue or policy, at once: the next
        dispatch runs up to `max_concurrent` tasks (running ones finish either way) and
        takes waiting tasks in the new policy's order."""
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self._max_concurrent = max_concurrent
        self._queue.retune(queue_capacity, policy)
        self._wake.set()

    def adopt(self, tasks: Iterable[InferenceTask]) -> None:
        """Queue tasks another gateway accepted and this one now holds in its store (a
        standby that came back with tasks it took while acting): past the queue's bound,
        as tasks recovered at start are; one already known here is left as it is."""
        for task in tasks:
            if task.task_id not in self._live and task.task_id not in self._recent:
                self._enqueue(task, force=True)

    # --- commands ----------------------------------------------------------------------

    async def submit(self, task: InferenceTask) -> TaskSnapshot:
        """Persist and queue a validated task; `QueueFull` when no room is left. A sampled
        task that names no seed is given one (`seeded`): the snapshot's task has it."""
        if not self._accepting:
            raise ServiceUnavailable("the scheduler is shutting down; send the task elsewhere")
        if why := self._refusal():
            raise ServiceUnavailable(f"{why}; send the task to another gateway")
        if task.task_id in self._live:
            raise TaskAlreadyExists(f"a task with id {task.task_id} already exists")
        if len(self._queue) + self._reserved >= self._queue.capacity:
            raise QueueFull(
                f"the task queue is full ({self._queue.capacity} tasks waiting); retry later"
            )
        task = seeded(task, self._draw)
        self._reserved += 1  # until queued: the copy to the standbys takes a while too
        try:
            await self._store_new(task)
            if self._on_accepted is not None:
                await self._on_accepted(task)
            live = self._enqueue(task, force=True)
        finally:
            self._reserved -= 1
        self._emit(TaskSubmitted(task.priority, len(task.input_ids)))
        return self._snapshot(live)

    async def _store_new(self, task: InferenceTask) -> None:
        """Commit an accepted task, with this loop turn's other writes. A store that
        refuses it (the disk full, the file locked) refuses the task: `ServiceUnavailable`
        (503, retriable), so the client sends it to another gateway."""
        try:
            await self._writes.add(task)
        except sqlite3.Error as e:
            log.error("could not store task %s: %s", task.task_id, e)
            raise ServiceUnavailable(
                f"the gateway could not store the task ({e}); send it to another gateway"
            ) from e

    async def cancel(self, task_id: str) -> TaskSnapshot:
        """Cancel a queued or running task; `InvalidTransition` once it has finished
        otherwise. Refused as `submit` is (`refusal`: a gateway cut off from the cluster,
        which may already have been replaced, cannot promise that no other gateway runs
        it). Idempotent: a task already cancelled is answered as cancelled again, and its
        end given to the standbys again (`on_cancelled`), so a cancel answered 503
        because no standby took it (it stood here all the same) is retried as the 503
        says, where a second cancel answered 409 "already finished" (a review)."""
        if why := self._refusal():
            raise ServiceUnavailable(f"{why}; send the cancel to another gateway")
        live = self._live.get(task_id)
        if live is None:
            snap = await self.snapshot(task_id)
            if snap.state.status is TaskStatus.CANCELLED:
                if self._on_cancelled is not None:
                    await self._on_cancelled(snap.task.task_id, snap.state)
                return snap
            transition(snap.state, Step.CANCEL)  # raises: a finished task is not live
            return snap
        if live.finishing:
            pass  # its terminal state is being committed: report it below
        elif live.state.status is TaskStatus.QUEUED:
            self._queue.remove(task_id)
            self._emit(QueueDepth(len(self._queue)))
            await self._finish(live, Step.CANCEL, None)
        elif live.runner is not None and live.state.status in CANCELLABLE:
            live.cancel_requested = True
            live.runner.cancel()
        await live.settled.wait()
        if not live.state.terminal:
            raise ServiceUnavailable(
                f"the gateway is shutting down; task {task_id} stays queued and runs again "
                "when it restarts"
            )
        if live.state.status is not TaskStatus.CANCELLED:
            raise InvalidTransition(
                f"task {task_id} finished as {live.state.status.value} before it could be cancelled"
            )
        if self._on_cancelled is not None:
            await self._on_cancelled(live.task.task_id, live.state)
        return self._snapshot(live)

    # --- queries -----------------------------------------------------------------------

    def refusing(self) -> str | None:
        """Why no task is accepted now (`refusal`), or None: for `/health`."""
        return self._refusal()

    async def snapshot(self, task_id: str) -> TaskSnapshot:
        """The task's current state; `TaskNotFound` when no such task was accepted."""
        live = self._live.get(task_id)
        if live is not None:
            return self._snapshot(live)
        recent = self._recent.get(task_id)
        if recent is not None:
            return recent[1]
        stored = await asyncio.to_thread(self._store.get, task_id)
        if stored is None:
            raise await self._not_found(task_id)
        if (kept := self._writes.unwritten(task_id)) is not None:  # the store says queued
            return TaskSnapshot(stored.task, kept)
        tokens = len(stored.result.output_ids) if stored.result else 0
        return TaskSnapshot(stored.task, stored.state, stored.result, tokens)

    async def _not_found(self, task_id: str) -> TaskNotFound:
        """Why `task_id` is not here: never accepted, or accepted and ended on a gateway
        that did not copy it here (the store holds its end only, `TaskStore.ended`)."""
        end = await asyncio.to_thread(self._store.ended, task_id)
        if end is None:
            return TaskNotFound(f"no task with id {task_id!r}; ids come from POST /inference")
        return TaskNotHeld(
            f"task {task_id!r} was accepted and {end.status.value} on another gateway, which "
            "copied its end here but not the task or its result (a gateway that was away "
            "is given the most recent results only): read it from the gateway that ran it "
            "once that one acts again, or submit the task again"
        )

    async def wait(self, task_id: str, timeout: float) -> TaskSnapshot:
        """The task once finished, or as it stands after `timeout` seconds."""
        live = self._live.get(task_id)
        if live is not None and timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await live.settled.wait()
        return self._snapshot(live) if live is not None else await self.snapshot(task_id)

    async def stream(self, task_id: str) -> AsyncIterator[Streamed]:
        """The task's tokens as they are produced, from the first; ends when it finishes
        (read its final state with `snapshot` then). A `Retraction` withdraws every token
        yielded before it (a check found them wrong; the tokens after it replace them);
        a stream opened after one starts from the tokens that replace them. The prompt's
        scores (`PromptScored`), when the task asked for them, come before its tokens."""
        live = self._live.get(task_id)
        if live is None:
            snap = await self.snapshot(task_id)
            result = snap.result
            if result is None:
                return
            if result.prompt_logprobs:
                yield PromptScored(result.prompt_logprobs)
            scored = len(result.logprobs) == len(result.output_ids)
            for token in result.logprobs if scored else result.output_ids:
                yield token
            return
        inbox: asyncio.Queue[Streamed | None] = asyncio.Queue()
        scored = len(live.scored) == len(live.tokens)
        backlog: list[Streamed] = [*live.scored] if scored else [*live.tokens]
        if live.prompt_scored is not None:
            backlog.insert(0, live.prompt_scored)
        live.subscribers.append(inbox)
        if live.settled.is_set():  # the scheduler stopped under it: no more tokens will come
            inbox.put_nowait(None)
        try:
            for item in backlog:
                yield item
            while (fresh := await inbox.get()) is not None:
                yield fresh
        finally:
            with contextlib.suppress(ValueError):
                live.subscribers.remove(inbox)

    async def expire_results(self, ttl_s: float, *, every_s: float = 60.0) -> None:
        """Forever: `expire_finished` on this scheduler's store, forgetting the pruned
        tasks' results in memory too. A pruned task's id then answers 404 like one never
        accepted."""
        await expire_finished(self._store, ttl_s, every_s=every_s, forget=self._forget)

    def _forget(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            self._recent.pop(task_id, None)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._runners)

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch tasks until `shutdown()`; returns once every engine call has ended."""
        self.serving = True
        try:
            async with asyncio.TaskGroup() as tg:
                while not self._stop.is_set():
                    for live in self._orphans:
                        if not live.state.terminal and not live.finishing:
                            tg.create_task(self._finish(live, Step.CANCEL, None))
                    self._orphans.clear()
                    self._dispatch(tg)
                    await self._wake.wait()
                    self._wake.clear()
                await self._drain()
        finally:
            self.serving = False
            self._accepting = False
            for live in self._live.values():  # unfinished: wake waiters and end streams
                live.settled.set()
                for inbox in live.subscribers:
                    inbox.put_nowait(None)

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop accepting and dispatching; running tasks get `grace_s` to finish."""
        self._accepting = False
        self._grace_s = grace_s
        self._stop.set()
        self._wake.set()

    def end_grace(self) -> None:
        """End the shutdown's grace period now: the running tasks stay unfinished in the
        store (each resumes from its checkpoint after a restart or a takeover)."""
        self._grace_over.set()

    # --- internals ---------------------------------------------------------------------

    def _enqueue(self, task: InferenceTask, *, force: bool) -> _Live:
        live = _Live(task, apply(SUBMITTED, Step.ENQUEUE), accepted=self._clock())
        self._queue.push(task, force=force)
        self._live[task.task_id] = live
        self._emit(QueueDepth(len(self._queue)))
        self._wake.set()
        return live

    def _dispatch(self, tg: asyncio.TaskGroup) -> None:
        while len(self._runners) < self._max_concurrent:
            task = self._queue.pop()
            if task is None:
                break
            live = self._live[task.task_id]
            live.state = apply(live.state, *DISPATCH)
            live.dispatched = self._clock()
            self._runners.add(task.task_id)
            live.runner = tg.create_task(self._execute(live), name=f"task-{task.task_id}")
            live.runner.add_done_callback(partial(self._reap, live))
            self._emit(QueueDepth(len(self._queue)))

    async def _drain(self) -> None:
        running = [live.runner for live in self._live.values() if live.runner is not None]
        if running and self._grace_s > 0 and not self._grace_over.is_set():
            finished = asyncio.ensure_future(asyncio.wait(running))
            over = asyncio.ensure_future(self._grace_over.wait())
            try:
                await asyncio.wait(
                    {finished, over}, timeout=self._grace_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in (finished, over):
                    waiter.cancel()
        for runner in running:
            runner.cancel()  # not cancel_requested: they stay unfinished in the store

    async def _execute(self, live: _Live) -> None:
        task_id = live.task.task_id
        REQUEST_ID.set(task_id)  # this task's own context: every line below names it
        try:
            result = await self._engine.run(live.task, partial(self._on_token, live))
            live.state = apply(live.state, *FINISH)
            result = self._assemble(live, result)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            aimed_at_us = current is not None and current.cancelling() > 0
            if live.cancel_requested:
                if current is not None:
                    current.uncancel()
                await self._finish(live, Step.CANCEL, None)
            elif aimed_at_us:  # shutdown: the task stays unfinished in the store
                raise
            else:  # the engine cancelled something of its own and let it escape
                log.error("task %s: the engine raised CancelledError", task_id)
                reason = "the engine abandoned the task (CancelledError); submit it again"
                await self._finish(live, Fail(reason, "internal_error"), None)
        except ButterflyError as e:
            log.warning("task %s failed: %s", task_id, e.message)
            await self._finish(live, Fail(e.message, e.kind), None)
        except Exception as e:
            log.exception("task %s failed with an unexpected error", task_id)
            await self._finish(live, Fail(f"{type(e).__name__}: {e}", "internal_error"), None)
        else:
            await self._finish(live, Step.COMMIT_COMPLETE, result)

    def _reap(self, live: _Live, runner: asyncio.Task[None]) -> None:
        """Free the slot. A runner cancelled before its first step never entered
        `_execute`'s handlers, so a requested cancel is finished by the dispatch loop."""
        self._runners.discard(live.task.task_id)
        if live.cancel_requested and live.task.task_id in self._live and not live.state.terminal:
            self._orphans.append(live)
        self._wake.set()

    def _assemble(self, live: _Live, result: InferenceResult) -> InferenceResult:
        """Aggregating: the text of the new tokens (unless the engine cut it at a stop
        string) and the scheduler's own timings."""
        decode = not result.text and not result.cut_at_stop
        if self._detokenize is not None and result.output_ids and decode:
            text = self._detokenize(live.task.input_ids, result.output_ids)
            result = replace(result, text=text)
        now = self._clock()
        timings = {
            **result.timings,
            "queued_s": live.dispatched - live.accepted,
            "total_s": now - live.accepted,
        }
        return replace(result, timings=timings)

    async def _finish(self, live: _Live, event: TaskEvent, result: InferenceResult | None) -> None:
        """Commit a terminal state, then show it and wake everyone waiting on the task.
        Readers see the task unfinished until the commit (`finishing` holds off cancels)."""
        state = transition(live.state, event)
        live.finishing = True
        try:
            await self._writes.finish(live.task.task_id, state, result)
        except Exception as e:  # the disk is full: the state is kept and written later
            log.exception("could not record task %s as %s", live.task.task_id, state)
            state, result = unstored(state, result, e)
            self._writes.keep(live.task.task_id, state, result)
        live.state, live.result = state, result
        if self._on_finished is not None:
            self._on_finished(live.task.task_id, state, result)
        self._emit(TaskFinished(OUTCOMES[live.state.status], self._clock() - live.accepted))
        snap, now = self._snapshot(live), self._clock()
        self._recent[live.task.task_id] = (now, snap)
        self._forget_old(now)
        del self._live[live.task.task_id]
        live.settled.set()
        for inbox in live.subscribers:
            inbox.put_nowait(None)

    def _forget_old(self, now: float) -> None:
        """Drop the finished tasks beyond `RECENT_RESULTS` or older than `RECENT_S` from
        memory (the store still has them)."""
        recent = self._recent
        while recent and (
            len(recent) > RECENT_RESULTS or now - next(iter(recent.values()))[0] > RECENT_S
        ):
            recent.popitem(last=False)

    def _on_token(self, live: _Live, token: Streamed) -> None:
        if isinstance(token, PromptScored):
            live.prompt_scored = token
            for inbox in live.subscribers:
                inbox.put_nowait(token)
            return
        if isinstance(token, Retraction):
            log.warning("task %s: tokens so far withdrawn (%s)", live.task.task_id, token.reason)
            live.tokens.clear()
            live.scored.clear()
            for inbox in live.subscribers:
                inbox.put_nowait(token)
            return
        now = self._clock()
        first, live.produced = not live.produced, True
        if isinstance(token, Sampled):
            live.scored.append(token)
            live.tokens.append(token.token)
        else:
            live.tokens.append(token)
        self._emit(TokenProduced(first, now - (live.accepted if first else live.last_token_at)))
        live.last_token_at = now
        for inbox in live.subscribers:
            inbox.put_nowait(token)

    def _snapshot(self, live: _Live) -> TaskSnapshot:
        position = None
        if live.state.status is TaskStatus.QUEUED:
            position = self._queue.position(live.task.task_id)
        return TaskSnapshot(live.task, live.state, live.result, len(live.tokens), position)


__all__ = ["Scheduler", "TaskSnapshot", "expire_finished"]
