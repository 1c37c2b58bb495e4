"""The scheduler on the real pipeline engine (stages in this process) and a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from butterfly.metrics.events import MetricsEvent, TaskFinished, TaskSubmitted, TokenProduced
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.engine import Retraction, TokenSink
from butterfly.schedule.queue import QueuePolicy
from butterfly.schedule.scheduler import RECENT_S, Scheduler
from butterfly.schedule.state import TaskStatus
from butterfly.schedule.store import TaskStore
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.errors import (
    InvalidTransition,
    QueueFull,
    ServiceUnavailable,
    TaskNotFound,
)
from butterfly.types.ids import RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceResult, InferenceTask, SamplingParams

pytestmark = pytest.mark.anyio

SPLIT = [LayerRange(0, 1), LayerRange(1, 3), LayerRange(3, 4)]
_ids = itertools.count()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def codec(tiny_model: Path) -> TextCodec:
    return TextCodec.load(tiny_model)


@pytest.fixture  # per test: the engine's tasks belong to the test's event loop
def engine(tiny_model: Path, codec: TextCodec) -> Iterator[LocalPipeline]:
    eng = LocalPipeline(tiny_model, SPLIT, stop_ids=codec.eos_ids)
    yield eng
    eng.close()


def make_task(
    codec: TextCodec, prompt: str, n: int = 12, priority: int = 0, **sampling: Any
) -> InferenceTask:
    return InferenceTask(
        task_id=RequestId(f"task-{next(_ids)}"),
        input_ids=tuple(codec.encode(prompt)),
        max_new_tokens=n,
        sampling=SamplingParams(**sampling),
        priority=priority,
    )


def reference(model: Path, codec: TextCodec, task: InferenceTask) -> list[int]:
    stages = [load_stage(model)]
    ids = task.input_ids
    return list(generate(stages, ids, task.max_new_tokens, task.sampling, codec.eos_ids))


@asynccontextmanager
async def running(scheduler: Scheduler) -> AsyncIterator[Scheduler]:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(scheduler.run())
        try:
            yield scheduler
        finally:
            scheduler.shutdown()


def new_scheduler(engine: LocalPipeline, path: Path, **kw: Any) -> tuple[Scheduler, TaskStore]:
    store = TaskStore(path)
    return Scheduler(engine=engine, store=store, **kw), store


def stored_status(store: TaskStore, task_id: str) -> TaskStatus | None:
    """The status `store` holds for the task (None: it holds none)."""
    stored = store.get(task_id)
    return None if stored is None else stored.state.status


async def test_outputs_equal_generate_greedy_and_sampled(
    tiny_model: Path, codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    events: list[MetricsEvent] = []
    sched, store = new_scheduler(
        engine, tmp_path / "t.db", emit=events.append, detokenize=codec.continuation
    )
    tasks = [
        make_task(codec, "The butterfly", 16),
        make_task(codec, "flaps its wings", 20, temperature=1.0, seed=7),
        make_task(codec, "over the sea", 9, temperature=0.8, top_k=40, top_p=0.9, seed=3),
    ]
    async with running(sched):
        for t in tasks:  # all at once: they interleave token by token on the worker
            await sched.submit(t)
        done = [await sched.wait(t.task_id, 60) for t in tasks]
    for t, snap in zip(tasks, done, strict=True):
        assert snap.state.status is TaskStatus.COMPLETED
        assert snap.result is not None
        assert list(snap.result.output_ids) == reference(tiny_model, codec, t)
        assert snap.result.text == codec.decode(list(snap.result.output_ids))
        assert [s.layers for s in snap.result.stages] == SPLIT
    assert sum(isinstance(e, TaskSubmitted) for e in events) == 3
    assert sum(isinstance(e, TokenProduced) and e.first for e in events) == 3
    assert [e.status for e in events if isinstance(e, TaskFinished)] == ["completed"] * 3
    store.close()


async def test_priority_policy_dispatches_high_first(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    sched, store = new_scheduler(
        engine, tmp_path / "t.db", policy=QueuePolicy.PRIORITY, max_concurrent=1
    )
    tasks = [make_task(codec, "x", 2, priority=p) for p in (0, 5, 1, 5)]
    for t in tasks:  # queued before the loop starts, so the policy alone picks the order
        await sched.submit(t)
    assert (await sched.snapshot(tasks[3].task_id)).queue_position == 1
    finished: list[int] = []

    async def watch(i: int) -> None:
        await sched.wait(tasks[i].task_id, 60)
        finished.append(i)

    async with running(sched), asyncio.TaskGroup() as tg:
        for i in range(len(tasks)):
            tg.create_task(watch(i))
    assert finished == [1, 3, 2, 0]
    store.close()


async def test_cancel_queued_and_running_tasks(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    sched, store = new_scheduler(engine, tmp_path / "t.db", max_concurrent=1)
    long = make_task(codec, "a long one", 400)
    queued = make_task(codec, "waiting", 4)
    after = make_task(codec, "after", 4)
    async with running(sched):
        await sched.submit(long)
        await sched.submit(queued)
        async with aclosing(sched.stream(long.task_id)) as stream:
            await anext(stream)  # the long task is running
            assert (await sched.cancel(queued.task_id)).state.status is TaskStatus.CANCELLED
            snap = await sched.cancel(long.task_id)
            assert snap.state.status is TaskStatus.CANCELLED
            assert 0 < snap.tokens_generated < 400
            rest = [t async for t in stream]  # the stream ends instead of hanging
            assert 1 + len(rest) == snap.tokens_generated
        await sched.submit(after)  # the slot was freed
        assert (await sched.wait(after.task_id, 60)).state.status is TaskStatus.COMPLETED
        with pytest.raises(InvalidTransition):
            await sched.cancel(after.task_id)
        with pytest.raises(TaskNotFound):
            await sched.cancel("no-such-task")
    for t, status in [(long, "cancelled"), (queued, "cancelled"), (after, "completed")]:
        got = store.get(t.task_id)
        assert got is not None and got.state.status == status
    store.close()


async def test_wait_times_out_with_the_current_state(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    sched, store = new_scheduler(engine, tmp_path / "t.db")
    t = make_task(codec, "never dispatched", 4)
    await sched.submit(t)  # the loop is not running: the task stays queued
    snap = await sched.wait(t.task_id, 0.05)
    assert snap.state.status is TaskStatus.QUEUED and snap.result is None
    store.close()


async def test_full_queue_refuses_and_writes_nothing(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    sched, store = new_scheduler(engine, tmp_path / "t.db", queue_capacity=2)
    await sched.submit(make_task(codec, "a"))
    await sched.submit(make_task(codec, "b"))
    refused = make_task(codec, "c")
    with pytest.raises(QueueFull):
        await sched.submit(refused)
    assert store.get(refused.task_id) is None
    store.close()


async def test_a_cancel_answered_503_is_retried_and_the_standbys_asked_again(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    """A cancel that no standby took answers 503 though it stands on this gateway; the
    retry the 503 asks for answers cancelled again and gives the standbys the end once
    more, where it answered 409 "already finished" and asked nobody (a review)."""
    asked: list[str] = []

    async def on_cancelled(task_id: str, state: object) -> None:
        asked.append(task_id)
        if len(asked) == 1:
            raise ServiceUnavailable("no standby gateway took the cancel")

    sched, store = new_scheduler(engine, tmp_path / "t.db", on_cancelled=on_cancelled)
    task = make_task(codec, "cancel me", 4)
    await sched.submit(task)
    with pytest.raises(ServiceUnavailable, match="no standby"):
        await sched.cancel(task.task_id)
    snap = await sched.cancel(task.task_id)
    assert snap.state.status is TaskStatus.CANCELLED
    assert asked == [task.task_id, task.task_id]
    store.close()


async def test_a_cut_off_gateway_refuses_cancels_as_it_refuses_tasks(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    """A gateway cut off from the cluster (`refusal`) may already have been replaced: a
    cancel it answered could not stop the task on the gateway that runs it now. Only
    `submit` checked (a review); the queued task stays queued, nothing is written."""
    why: list[str] = []
    sched, store = new_scheduler(engine, tmp_path / "t.db", refusal=lambda: why[0] if why else None)
    task = make_task(codec, "kept")
    await sched.submit(task)
    why.append("node 0 has lost 3 of the 4 members")
    with pytest.raises(ServiceUnavailable, match="lost 3 of the 4 members"):
        await sched.cancel(task.task_id)
    assert stored_status(store, task.task_id) is TaskStatus.QUEUED
    store.close()


async def test_a_sampled_task_without_a_seed_is_stored_with_one(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    """Its RNG was seeded afresh at every run: a standby running it again after a failover
    drew other tokens than the client had read (a review). The seed is drawn once, before
    the task is stored (and so copied); greedy and seeded tasks are stored as sent."""
    sched, store = new_scheduler(engine, tmp_path / "t.db", draw=lambda: 12345)
    unseeded = make_task(codec, "drawn", temperature=1.0)
    kept = [make_task(codec, "greedy"), make_task(codec, "named", temperature=1.0, seed=7)]
    assert (await sched.submit(unseeded)).task.sampling.seed == 12345
    for task in kept:
        assert (await sched.submit(task)).task == task
    stored = {t.task_id: store.get(t.task_id) for t in (unseeded, *kept)}
    seeds = {task_id: s.task.sampling.seed for task_id, s in stored.items() if s is not None}
    assert seeds == {unseeded.task_id: 12345, kept[0].task_id: None, kept[1].task_id: 7}
    store.close()


async def test_engine_errors_fail_the_task_not_the_scheduler(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    sched, store = new_scheduler(engine, tmp_path / "t.db")
    bad = InferenceTask(RequestId("bad"), input_ids=(1, 99999), max_new_tokens=3)
    good = make_task(codec, "fine", 3)
    async with running(sched):
        await sched.submit(bad)
        failed = await sched.wait(bad.task_id, 60)
        assert failed.state.status is TaskStatus.FAILED
        assert failed.state.error_type == "invalid_input" and "99999" in failed.state.reason
        # submitted after: a step batches the requests queued together, and a token id
        # outside the vocabulary fails its whole batch (the API refuses such ids first)
        await sched.submit(good)
        assert (await sched.wait(good.task_id, 60)).state.status is TaskStatus.COMPLETED
    store.close()


async def test_restart_runs_tasks_queued_or_running_before(
    tiny_model: Path, codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    db = tmp_path / "tasks.sqlite"
    first, first_store = new_scheduler(engine, db, max_concurrent=1)
    running_task = make_task(codec, "interrupted", 300, temperature=1.0, seed=11)
    queued_task = make_task(codec, "still queued", 6)
    async with running(first):
        await first.submit(running_task)
        await first.submit(queued_task)
        async with aclosing(first.stream(running_task.task_id)) as stream:
            await anext(stream)
    # run() returned: the running task was cancelled by the shutdown, not by a client
    first_store.close()

    second, second_store = new_scheduler(engine, db, max_concurrent=1)
    assert [t.task_id for t in second_store.recovered] == [
        running_task.task_id,
        queued_task.task_id,
    ]
    async with running(second):
        done = [await second.wait(t.task_id, 120) for t in (running_task, queued_task)]
    for t, snap in zip((running_task, queued_task), done, strict=True):
        assert snap.state.status is TaskStatus.COMPLETED and snap.result is not None
        assert list(snap.result.output_ids) == reference(tiny_model, codec, t)
    second_store.close()
    third = TaskStore(db)
    assert third.recovered == ()
    third.close()


async def test_adopted_tasks_run_past_a_full_queue_and_known_ones_are_left_alone(
    tiny_model: Path, codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    """Tasks another gateway accepted (a returning standby held them) are stored here by
    the pull, then adopted: queued past the bound, as tasks recovered at start are,
    while one already known here is not queued twice."""
    sched, store = new_scheduler(engine, tmp_path / "t.db", queue_capacity=1, max_concurrent=1)
    mine = make_task(codec, "mine", 4)
    theirs = [make_task(codec, f"theirs {i}", 4) for i in range(2)]
    await sched.submit(mine)
    for task in theirs:
        store.copy(task)
    sched.adopt([*theirs, mine])
    assert sched.queue_depth == 3
    async with running(sched):
        done = [await sched.wait(t.task_id, 60) for t in (mine, *theirs)]
    for task, snap in zip((mine, *theirs), done, strict=True):
        assert snap.state.status is TaskStatus.COMPLETED and snap.result is not None
        assert list(snap.result.output_ids) == reference(tiny_model, codec, task)
        assert stored_status(store, task.task_id) is TaskStatus.COMPLETED
    store.close()


async def test_shutdown_releases_waiters_and_keeps_the_task(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    sched, store = new_scheduler(engine, tmp_path / "t.db", max_concurrent=1)
    task = make_task(codec, "interrupted", 400)
    async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
        tg.create_task(sched.run())
        await sched.submit(task)
        async with aclosing(sched.stream(task.task_id)) as stream:
            await anext(stream)
            waiter = tg.create_task(sched.wait(task.task_id, 300))
            sched.shutdown()
            [t async for t in stream]  # ends with the scheduler, not with the task
        snap = await waiter  # released long before its 300 s
    assert not snap.state.terminal
    with pytest.raises(ServiceUnavailable, match="shutting down"):
        await sched.cancel(task.task_id)  # a stopping gateway keeps the task for its restart
    with pytest.raises(ServiceUnavailable):
        await sched.submit(make_task(codec, "too late"))
    assert stored_status(store, task.task_id) is TaskStatus.QUEUED
    store.close()


async def test_ending_the_grace_stops_at_once_and_keeps_the_running_task(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    """A stopping gateway whose running tasks cannot progress ends their grace early
    (wiring.gateway): the scheduler then stops without waiting the grace out, and the
    task stays unfinished for its restart."""
    sched, store = new_scheduler(engine, tmp_path / "t.db", max_concurrent=1)
    task = make_task(codec, "interrupted", 400)
    async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
        run = tg.create_task(sched.run())
        await sched.submit(task)
        async with aclosing(sched.stream(task.task_id)) as stream:
            await anext(stream)
            sched.shutdown(grace_s=3600.0)  # the test's timeout is far below the grace
            await asyncio.sleep(0)
            assert not run.done()  # in its grace, the task still running
            sched.end_grace()
            [t async for t in stream]
        await run
    stored = store.get(task.task_id)
    assert stored is not None and not stored.state.terminal
    store.close()


class AbandoningEngine(LocalPipeline):
    """A faulty part: an engine that lets a CancelledError of its own escape."""

    async def run(self, task: InferenceTask, on_token: Callable[[int], None]) -> InferenceResult:
        raise asyncio.CancelledError


async def test_an_engine_cancelling_its_own_work_fails_the_task_only(
    tiny_model: Path, codec: TextCodec, tmp_path: Path
) -> None:
    engine = AbandoningEngine(tiny_model, [LayerRange(0, 4)])
    sched, store = new_scheduler(engine, tmp_path / "t.db")
    task = make_task(codec, "x")
    async with running(sched):
        await sched.submit(task)
        snap = await sched.wait(task.task_id, 60)
        assert snap.state.status is TaskStatus.FAILED and "abandoned" in snap.state.reason
        assert sched.serving
    engine.close()
    store.close()


async def test_finished_results_expire_after_their_ttl(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    """`scheduling.result_ttl_s`: a finished task is served until it is older than the
    TTL, then its id answers like one never accepted, from memory and from SQLite."""
    sched, store = new_scheduler(engine, tmp_path / "t.db")
    async with running(sched):
        t = make_task(codec, "short-lived", 2)
        await sched.submit(t)
        done = await sched.wait(t.task_id, 30)
        assert done.state.status is TaskStatus.COMPLETED
        expiry = asyncio.create_task(sched.expire_results(0.4, every_s=0.05))
        try:
            assert (await sched.snapshot(t.task_id)).result is not None  # not yet expired
            for _ in range(60):  # bounded: 3 s
                await asyncio.sleep(0.05)
                if store.get(t.task_id) is None:
                    break
            with pytest.raises(TaskNotFound):
                await sched.snapshot(t.task_id)
        finally:
            expiry.cancel()
    store.close()


class RetractingEngine(LocalPipeline):
    """A composed engine that streams two tokens, withdraws them (as the pipeline engine
    does when an audit catches a liar), then runs the task for real."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go_on, self.retracted, self.finish = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        on_token(7)
        on_token(8)
        await self.go_on.wait()
        on_token(Retraction("an audit caught a liar"))
        self.retracted.set()
        await self.finish.wait()
        return await super().run(task, on_token)


async def test_a_retraction_reaches_every_stream_and_empties_the_task_tokens(
    tiny_model: Path, codec: TextCodec, tmp_path: Path
) -> None:
    engine = RetractingEngine(tiny_model, SPLIT, stop_ids=codec.eos_ids)
    sched, store = new_scheduler(engine, tmp_path / "t.db")
    task = make_task(codec, "withdrawn", 6)
    async with asyncio.timeout(60), running(sched):
        await sched.submit(task)
        async with aclosing(sched.stream(task.task_id)) as early:
            assert [await anext(early), await anext(early)] == [7, 8]
            engine.go_on.set()
            assert isinstance(await anext(early), Retraction)
            await engine.retracted.wait()
            assert (await sched.snapshot(task.task_id)).tokens_generated == 0
            late = sched.stream(task.task_id)  # subscribed after: never sees the withdrawn
            first = asyncio.ensure_future(anext(late))
            await asyncio.sleep(0)  # it subscribes (and waits) before the run goes on
            engine.finish.set()
            rest = [t async for t in early]
            assert [await first, *[t async for t in late]] == rest
            assert rest == reference(tiny_model, codec, task)
        snap = await sched.wait(task.task_id, 30)
        assert list(snap.result.output_ids if snap.result else ()) == rest
        assert snap.tokens_generated == len(rest)
    engine.close()
    store.close()


async def test_finished_results_leave_memory_after_a_minute_and_stay_readable(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    """Finished results are kept in memory by count and by age (`RECENT_S`), so under a
    steady load the gateway's memory levels off within a minute (bench/soak.py: 128 by
    count alone took 8-9 minutes to fill); an older result is read from the store."""
    now = [1000.0]
    sched, store = new_scheduler(engine, tmp_path / "t.db", clock=lambda: now[0])
    async with running(sched):
        early = [make_task(codec, "The butterfly", 3) for _ in range(3)]
        for t in early:
            await sched.submit(t)
            await sched.wait(t.task_id, 60)
        assert len(sched._recent) == 3
        now[0] += RECENT_S + 1
        late = make_task(codec, "flaps its wings", 3)
        await sched.submit(late)
        await sched.wait(late.task_id, 60)
        assert list(sched._recent) == [late.task_id]
        for t in early:  # from the store now, as they were
            snap = await sched.snapshot(t.task_id)
            assert snap.state.status is TaskStatus.COMPLETED and snap.result is not None
            assert len(snap.result.output_ids) == 3
    store.close()


class FullDisk:
    """Another writer on the gateway's disk: it fills it to the last byte SQLite can use
    (`max_page_count`, SQLITE_FULL "database or disk is full"), then frees it again."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self._db = sqlite3.connect(store.path, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")

    def fill(self) -> None:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        for conn in (self._db, self._store._db):
            conn.execute(f"PRAGMA max_page_count={pages}")
        n = 0
        for size in (2000, 500, 100, 20, 1):
            for _ in range(1000):
                n += 1
                try:
                    self._db.execute(
                        "INSERT INTO tasks (task_id, status, reason, task, accepted_at) "
                        "VALUES (?, 'completed', ?, '{}', 0)",
                        (f"filler-{n}", "x" * size),
                    )
                except sqlite3.OperationalError as e:
                    assert "full" in str(e), e
                    break

    def free(self) -> None:
        self._db.execute("DELETE FROM tasks WHERE task_id LIKE 'filler-%'")
        for conn in (self._db, self._store._db):
            conn.execute("PRAGMA max_page_count=4294967294")
        self._db.close()


async def test_states_the_disk_could_not_take_stay_final_and_are_stored_later(
    codec: TextCodec, engine: LocalPipeline, tmp_path: Path
) -> None:
    """The disk fills while a task runs and two wait: its result is not handed out (it
    fails: submit it again), a cancel still cancels, a new task is refused with a 503;
    once out of memory they still read failed and cancelled (the store says queued), and
    the next commit after the disk has room again stores them so."""
    now = [1000.0]
    sched, store = new_scheduler(engine, tmp_path / "t.db", clock=lambda: now[0], max_concurrent=1)
    disk = FullDisk(store)
    async with running(sched):
        ran, cancelled, later = (make_task(codec, "The butterfly", n) for n in (40, 3, 3))
        for task in (ran, cancelled, later):
            await sched.submit(task)
        disk.fill()  # before the first task can finish
        with pytest.raises(ServiceUnavailable, match="another gateway"):
            await sched.submit(make_task(codec, "refused", 3))
        assert (await sched.cancel(cancelled.task_id)).state.status is TaskStatus.CANCELLED
        failed = await sched.wait(ran.task_id, 60)
        assert failed.state.status is TaskStatus.FAILED, failed.state
        assert "could not be stored" in failed.state.reason and failed.result is None
        now[0] += RECENT_S + 1  # the first two leave memory when the third ends
        assert (await sched.cancel(later.task_id)).state.status is TaskStatus.CANCELLED
        assert (stored := store.get(ran.task_id)) is not None
        # a failure's reason does not fit (a cancel may, in a page's last bytes)
        assert stored.state.status is TaskStatus.QUEUED
        for task, status in ((ran, TaskStatus.FAILED), (cancelled, TaskStatus.CANCELLED)):
            assert (await sched.wait(task.task_id, 0.2)).state.status is status
        with pytest.raises(InvalidTransition):
            await sched.cancel(ran.task_id)
        disk.free()
        fresh = make_task(codec, "flaps its wings", 3)
        await sched.submit(fresh)
        assert (await sched.wait(fresh.task_id, 60)).state.status is TaskStatus.COMPLETED
    for task, status in ((ran, TaskStatus.FAILED), (cancelled, TaskStatus.CANCELLED)):
        assert (stored := store.get(task.task_id)) is not None
        assert stored.state == (await sched.snapshot(task.task_id)).state
        assert stored.state.status is status
    assert store.get(later.task_id).state.status is TaskStatus.CANCELLED  # type: ignore[union-attr]
    store.close()


class HeldEngine:
    """Runs no task to its end: every task stays running, so the queue only grows."""

    async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_the_queue_bound_holds_while_tasks_are_copied_to_standbys(
    tmp_path: Path,
) -> None:
    """A task is counted against `max_queue` from its capacity check until it is queued,
    the copy to the standby gateways (`on_accepted`, 50 ms here) included."""

    async def copy_to_standbys(task: InferenceTask) -> None:
        await asyncio.sleep(0.05)

    store, capacity = TaskStore(tmp_path / "t.db"), 4
    sched = Scheduler(
        engine=HeldEngine(),  # type: ignore[arg-type]
        store=store,
        max_concurrent=1,
        queue_capacity=capacity,
        on_accepted=copy_to_standbys,
    )
    accepted: list[str] = []

    async def client(i: int) -> None:
        task = InferenceTask(task_id=RequestId(f"t{i}"), input_ids=(1, 2), max_new_tokens=2)
        with contextlib.suppress(QueueFull):
            await sched.submit(task)
            accepted.append(task.task_id)

    async with running(sched):
        async with asyncio.TaskGroup() as clients:
            for i in range(40):  # a client every 5 ms for 200 ms
                clients.create_task(client(i))
                await asyncio.sleep(0.005)
        assert sched.queue_depth <= capacity
        sched.end_grace()
    assert len(accepted) <= capacity + 1  # one running, `capacity` waiting
    store.close()
