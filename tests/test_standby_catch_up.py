"""What the acting gateway owes its standbys when one is stuck, refuses, or joins the
gateways later (a review of the catch-up in the twenty-fourth session): one standby on
an open circuit holds neither the 202s nor the other standbys back, one that refuses is
tried ever less often, and one added later is given every task before /health says it
holds them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from pathlib import Path

import pytest

from butterfly.control.gateway_role import GatewayRole
from butterfly.net.framing import Envelope
from butterfly.schedule.scheduler import Scheduler
from butterfly.schedule.state import TaskState, TaskStatus
from butterfly.schedule.store import TaskStore, task_to_json
from butterfly.types.errors import (
    CircuitOpen,
    SendTimeout,
    ServiceUnavailable,
    TaskNotFound,
    TaskNotHeld,
)
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire import standby as wire
from butterfly.types.wire.standby import TaskCopied, TaskSync, TaskSyncReply
from butterfly.wiring.standby import CIRCUIT_WAIT_S, RESYNC_RESULTS, TaskReplicas
from butterfly.wiring.task_sync import take

pytestmark = pytest.mark.timeout(60)
ACTING, S1, S2 = NodeId(0), NodeId(1), NodeId(2)


class Fake:
    """ask: per-peer behaviour ('ok', 'refuse', 'circuit'); send: always delivered. A
    `TaskSync` is answered with `held[peer]` (records as a standby's `on_sync` makes)."""

    def __init__(self, mode: dict[NodeId, str]) -> None:
        self.mode, self.asks, self.copied = mode, {}, {}
        self.held: dict[NodeId, list[list[object]]] = {}
        self.syncs = 0

    async def ask(self, peer, msg, payload=b"", **kw):
        self.asks[peer] = self.asks.get(peer, 0) + 1
        await asyncio.sleep(0)
        m = self.mode[peer]
        if m == "circuit":
            raise CircuitOpen(f"circuit to node {peer} is open")
        if m == "silent":  # heard by the detector, cut off over TCP
            await asyncio.sleep(kw["timeout"])
            raise SendTimeout(f"node {peer} did not answer within {kw['timeout']} s")
        if isinstance(msg, TaskSync) and m == "unreadable":  # its disk failed
            return TaskSyncReply(peer, 0, "OperationalError: disk I/O error"), b""
        if isinstance(msg, TaskSync):
            self.syncs += 1
            held = self.held.get(peer, [])
            return TaskSyncReply(peer, len(held)), json.dumps(held).encode()
        if m == "refuse":
            return TaskCopied(peer, msg.task_id, False, "OperationalError: disk full"), b""
        self.copied.setdefault(peer, set()).add(msg.task_id)
        return TaskCopied(peer, msg.task_id, True), b""

    async def send(self, peer, msg, payload=b"", **kw):
        await asyncio.sleep(0)


def acting(tmp_path: Path, gateways, mode, timeout_s=5.0) -> tuple[TaskReplicas, Fake]:
    role = GatewayRole(gateways=gateways, status=lambda n: "healthy", evicted=tuple)
    t = Fake(mode)
    r = TaskReplicas(
        node=ACTING,
        path=tmp_path / "a.db",
        role=role,
        transport=t,  # type: ignore[arg-type]
        status=lambda n: "healthy",
        timeout_s=lambda: timeout_s,
    )
    return r, t


def no_adoption(tasks: list[InferenceTask]) -> None:
    raise AssertionError(f"no standby holds tasks here, yet {tasks} were adopted")


async def stop(loop: asyncio.Task[None], r: TaskReplicas) -> None:
    """End `keep_standbys` and close the store."""
    loop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop
    r.close()


def fill(r: TaskReplicas, unfinished: int, finished: int) -> None:
    for i in range(unfinished + finished):
        r.store.add(InferenceTask(RequestId(f"t{i}"), (1, 2, i), max_new_tokens=2))
    for i in range(unfinished, unfinished + finished):
        r.store.finish(RequestId(f"t{i}"), TaskState(TaskStatus.FAILED, "x", "E"), None)


async def test_a_standby_stuck_on_an_open_circuit_starves_the_other_standbys_resync(
    tmp_path: Path,
) -> None:
    """S1 is 'healthy' but its circuit never lets calls through; S2 works. The results
    phase copies one at a time, each waiting the whole copy timeout: S2 waits behind."""
    r, t = acting(tmp_path, [ACTING, S1, S2], {S1: "circuit", S2: "ok"}, timeout_s=0.3)
    fill(r, unfinished=1, finished=20)
    loop = asyncio.create_task(r.keep_standbys(no_adoption))
    try:
        start = time.monotonic()
        while not r.holds_every_task(S2) or S2 in r._missed or "t0" not in t.copied.get(S2, ()):
            await asyncio.sleep(0.02)
            if time.monotonic() - start > 3.0:
                break
        took = time.monotonic() - start
        assert took < 1.0, f"standby 2 (reachable) given its tasks only after {took:.1f} s"
    finally:
        await stop(loop, r)


async def test_a_standby_whose_circuit_stays_open_holds_back_one_202_at_most(
    tmp_path: Path,
) -> None:
    """Every accepted task waited the whole copy timeout (5 s by default) while the
    circuit to a 'healthy' standby stayed open (heard in, but it cannot be dialled):
    the first waits for the circuit (it half-opens within a second), the rest do not."""
    r, _ = acting(tmp_path, [ACTING, S1], {S1: "circuit"}, timeout_s=5.0)
    try:
        took = []
        for i in range(3):
            start = time.monotonic()
            await r.accepted(InferenceTask(RequestId(f"a{i}"), (1,), max_new_tokens=1))
            took.append(time.monotonic() - start)
        assert took[0] <= CIRCUIT_WAIT_S + 0.3, took
        assert max(took[1:]) < 0.1, f"202s waited {[round(x, 2) for x in took]} s"
    finally:
        r.close()


async def test_a_standby_refusing_copies_is_resynced_every_50ms_with_every_result(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A healthy standby whose store refuses writes (disk full): every 50 ms, every
    unfinished task and up to 1024 results again, one warning each."""
    r, t = acting(tmp_path, [ACTING, S1], {S1: "refuse"})
    fill(r, unfinished=2, finished=200)
    caplog.set_level(logging.WARNING, logger="butterfly.wiring.standby")
    loop = asyncio.create_task(r.keep_standbys(no_adoption))
    try:
        await asyncio.sleep(1.0)
    finally:
        await stop(loop, r)
    warnings = len(caplog.records)
    print(f"asks in 1 s: {t.asks.get(S1)}, warnings: {warnings}")
    assert t.asks.get(S1, 0) < 1000, f"{t.asks.get(S1)} copies asked of one standby in 1 s"
    assert warnings < 100, f"{warnings} warnings in 1 s"


async def test_a_gateway_added_later_is_not_said_to_hold_every_task_until_resynced(
    tmp_path: Path,
) -> None:
    """A standby added to cluster.gateways while tasks are unfinished: /health says it
    holds every task, and keep_standbys never gives it those tasks."""
    r, t = acting(tmp_path, [ACTING, S1], {S1: "ok", S2: "ok"})
    fill(r, unfinished=3, finished=0)
    loop = asyncio.create_task(r.keep_standbys(no_adoption))
    try:
        await asyncio.sleep(0.2)
        r._role.follow([ACTING, S1, S2])
        await asyncio.sleep(0.3)
        held = t.copied.get(S2, set())
        assert not (r.holds_every_task(S2) and held != {"t0", "t1", "t2"}), (
            f"holds_every_task(2) is True, yet node 2 was given {sorted(held)}"
        )
    finally:
        await stop(loop, r)


async def test_held_a_copy_refused_during_a_resync_keeps_holds_every_task_false(
    tmp_path: Path,
) -> None:
    r, t = acting(tmp_path, [ACTING, S1], {S1: "ok"})
    fill(r, unfinished=40, finished=0)
    ask = t.ask

    async def slow_ask(peer, msg, payload=b"", **kw):
        await asyncio.sleep(0.01)
        if msg.task_id == "late":
            return TaskCopied(peer, msg.task_id, False, "refused"), b""
        return await ask(peer, msg, payload, **kw)

    t.ask = slow_ask  # type: ignore[method-assign]
    loop = asyncio.create_task(r.keep_standbys(no_adoption))
    try:
        while S1 not in r._resyncing:
            await asyncio.sleep(0.001)
        await r.accepted(InferenceTask(RequestId("late"), (9,), max_new_tokens=1))
        while S1 in r._resyncing:
            await asyncio.sleep(0.001)
        assert not r.holds_every_task(S1)
    finally:
        await stop(loop, r)


async def test_a_standby_that_keeps_refusing_is_resynced_ever_less_often(tmp_path: Path) -> None:
    """A failed resync is tried again after a doubling wait (at most 2 s): a few in a
    second, not the twenty that the 50 ms check would make."""
    r, t = acting(tmp_path, [ACTING, S1], {S1: "refuse"})
    fill(r, unfinished=1, finished=0)
    loop = asyncio.create_task(r.keep_standbys(no_adoption))
    try:
        await asyncio.sleep(1.0)
    finally:
        await stop(loop, r)
    assert 2 <= t.asks.get(S1, 0) <= 6, t.asks  # one copy per resync
    assert not r.holds_every_task(S1)


async def test_a_standby_down_at_the_takeover_hands_over_the_tasks_only_it_held(
    tmp_path: Path,
) -> None:
    """S1 did not answer when this node took over (it was down: it had been acting, and
    accepted tasks it could not copy here). Back, it is resynced: first its tasks are
    taken, the unfinished ones queued here (`adopt`) with their checkpoints, a finished
    one's end kept. Before, they stayed in S1's store, unknown here, until S1 acted."""
    r, t = acting(tmp_path, [ACTING, S1], {S1: "circuit"})
    assert await r.pull() == 0  # S1 does not answer at the takeover
    t.mode[S1] = "ok"
    rng = base64.b64encode(b"rng-state").decode()
    task = InferenceTask(RequestId("u1"), (1, 2), max_new_tokens=4)
    with_checkpoint = InferenceTask(RequestId("u2"), (3,), max_new_tokens=4)
    done = InferenceTask(RequestId("f1"), (4,), max_new_tokens=4)
    t.held[S1] = [
        ["u1", task_to_json(task), None],
        ["u2", task_to_json(with_checkpoint), [[7, 8], rng, 3]],
        ["f1", task_to_json(done), None, ["failed", "gone", "StageLost", None]],
        ["bad", "{not json", None],  # one bad record costs that task only
    ]
    adopted: list[InferenceTask] = []
    loop = asyncio.create_task(r.keep_standbys(adopted.extend))
    try:
        start = time.monotonic()
        while len(adopted) < 2 and time.monotonic() - start < 3.0:
            await asyncio.sleep(0.02)
        assert sorted(a.task_id for a in adopted) == ["u1", "u2"]
        assert adopted[0] == task or adopted[1] == task
        checkpoint = r.store.checkpoint(RequestId("u2"))
        assert checkpoint is not None and checkpoint.tokens == (7, 8)
        assert checkpoint.rng_state == b"rng-state"
        finished = r.store.get("f1")
        assert finished is not None and finished.state.terminal
        syncs = t.syncs
        r._missed.add(S1)  # a later copy lost: resynced again, but not asked again
        while S1 in r._missed or r._resyncing:
            await asyncio.sleep(0.02)
            if time.monotonic() - start > 5.0:
                break
        assert t.syncs == syncs == 1  # (the takeover's ask met the open circuit)
    finally:
        await stop(loop, r)


async def test_a_standby_that_does_not_answer_holds_back_one_202_and_is_resynced(
    tmp_path: Path,
) -> None:
    """Heard by the detector but cut off over TCP, a standby's copies time out: the
    first 202 waits the copy's timeout, the next ones do not wait for it (every one
    waited 5 s: a review), and it is given them once it answers again."""
    r, t = acting(tmp_path, [ACTING, S1], {S1: "silent"}, timeout_s=0.3)
    took = []
    for i in range(3):
        task = InferenceTask(RequestId(f"a{i}"), (1,), max_new_tokens=1)
        r.store.add(task)  # as the scheduler does before the copy
        start = time.monotonic()
        await r.accepted(task)
        took.append(time.monotonic() - start)
    assert took[0] >= 0.3 and max(took[1:]) < 0.1, took
    assert not r.holds_every_task(S1)
    t.mode[S1] = "ok"
    loop = asyncio.create_task(r.keep_standbys(no_adoption))
    try:
        start = time.monotonic()
        while not r.holds_every_task(S1) and time.monotonic() - start < 3.0:
            await asyncio.sleep(0.02)
        assert t.copied.get(S1) == {"a0", "a1", "a2"}
        await r.accepted(InferenceTask(RequestId("a3"), (1,), max_new_tokens=1))
        assert "a3" in t.copied[S1]  # waited for again: it answers
    finally:
        await stop(loop, r)


async def test_a_standby_that_answers_again_has_the_next_tasks_copy_before_its_202(
    tmp_path: Path,
) -> None:
    """After a copy to it timed out, the standby was skipped by the 202s until a resync
    reached it, up to 2 s after it answered again: a 202 in that window left no standby
    holding the task though one answered (a review). A 202 now sends it the copy and
    waits a moment for it."""
    r, t = acting(tmp_path, [ACTING, S1], {S1: "silent"}, timeout_s=0.3)
    loop = asyncio.create_task(r.keep_standbys(no_adoption))
    try:
        first = InferenceTask(RequestId("during-the-cut"), (1,), max_new_tokens=1)
        r.store.add(first)
        await r.accepted(first)  # times out: cut off over TCP, heard by the detector
        await asyncio.sleep(1.5)  # the cut lasts; resyncs fail and back off
        t.mode[S1] = "ok"
        later = InferenceTask(RequestId("after-the-cut"), (1,), max_new_tokens=1)
        r.store.add(later)
        await r.accepted(later)  # the 202 goes out when this returns
        assert "after-the-cut" in t.copied.get(S1, set())
    finally:
        await stop(loop, r)


async def test_a_standby_declared_failed_during_the_pull_is_not_waited_for(
    tmp_path: Path,
) -> None:
    """S1 was alive when the gateway asked for its tasks, then went silent (cut off, its
    connection still open). The gateway watches for failures only once its pull is done,
    so it waited out the ask's 5 s before re-planning around a node its detector had
    declared failed (a test of a lone range failed in CI: 400 heartbeats, no re-plan)."""
    statuses = {S1: "healthy", S2: "healthy"}
    r, t = acting(tmp_path, [ACTING, S1, S2], {S1: "silent", S2: "ok"})
    r._status = lambda n: statuses.get(n, "healthy")
    try:
        pulling = asyncio.create_task(r.pull())
        await asyncio.sleep(0.1)
        assert not pulling.done()  # S1 is still being asked
        statuses[S1] = "failed"
        assert await asyncio.wait_for(pulling, 2.0) == 0  # not the ask's 5 s timeout
        assert t.asks == {S1: 1, S2: 1} and S1 in r._unpulled  # S2 was still asked
    finally:
        r.close()


async def test_a_cancel_is_answered_only_once_a_standby_holds_its_end(tmp_path: Path) -> None:
    """A cancel's end went to the standbys one-way, after the client was told
    "cancelled": the gateway dying meanwhile left the standby's copy queued, and the
    standby that took over ran the task (a review). The end is now asked for: a standby
    that took it has it before `cancelled` returns, and none taking it is a 503."""
    cancel = TaskState(TaskStatus.CANCELLED)
    r, t = acting(tmp_path, [ACTING, S1, S2], {S1: "refuse", S2: "ok"})
    try:
        await r.cancelled(RequestId("one-took-it"), cancel)
        assert t.copied == {S2: {"one-took-it"}}
        t.mode[S2] = "refuse"
        with pytest.raises(ServiceUnavailable, match="no standby gateway took the cancel"):
            await r.cancelled(RequestId("none-took-it"), cancel)
    finally:
        r.close()
    alone, _ = acting(tmp_path / "alone", [ACTING], {})
    try:  # no standby to ask: as a 202 without one, not refused
        await alone.cancelled(RequestId("no-standby"), cancel)
    finally:
        alone.close()


def _record(name: str, checkpoint: object = None, *end: object) -> list[object]:
    task = InferenceTask(RequestId(name), (1, 2), max_new_tokens=2)
    return [name, task_to_json(task), checkpoint, *end]


RNG = base64.b64encode(b"r").decode()


@pytest.mark.parametrize(
    "bad",
    [
        [["x"], *_record("x")[1:]],  # bound as an id: sqlite3.ProgrammingError
        _record("y", [[5], RNG, [1], 0]),  # an epoch that is a list: the same
        _record("y", [[5], RNG, 1 << 64, 0]),  # too large for SQLite: OverflowError
        _record("y", [[5], RNG, True, 0]),
        _record("y", [["5"], RNG, 1, 0]),
        _record("y", [[5], 7, 1, 0]),
        _record("y", None, ["failed", ["reason"], "E", None]),
        _record("y", None, "completed"),
        [*_record("y"), None, "extra"],
        "y",
    ],
)
async def test_one_malformed_record_costs_that_task_only(tmp_path: Path, bad: object) -> None:
    """A standby's record whose fields are not of their types is skipped, the others
    taken: bound to SQLite unchecked, a list id or epoch raised out of `pull`, through
    the takeover, and ended the node taking over (a review)."""
    r, t = acting(tmp_path, [ACTING, S1], {S1: "ok"})
    t.held[S1] = [bad, _record("fine")]  # type: ignore[list-item]
    try:
        assert await r.pull() == 1
        assert r.store.get("fine") is not None and r.store.get("y") is None
        assert S1 not in r._unpulled
    finally:
        r.close()


async def test_a_standby_that_cannot_read_its_store_is_asked_again_later(
    tmp_path: Path,
) -> None:
    """Its answer says so (`TaskSyncReply.error`), and it is not counted as handed over:
    its tasks are taken when it is resynced."""
    r, _ = acting(tmp_path, [ACTING, S1], {S1: "unreadable"})
    try:
        assert await r.pull() == 0
        assert S1 in r._unpulled
    finally:
        r.close()


class Link:
    """The acting gateway's transport to a real standby's handlers; the first copy of
    `held` waits for `gate`, its second (the catch-up's results) is refused."""

    def __init__(self, standby: TaskReplicas, held: str = "") -> None:
        self.standby, self.held, self.copies = standby, held, 0
        self.gate, self.waiting = asyncio.Event(), asyncio.Event()

    async def ask(self, peer, msg, payload=b"", **kw):  # type: ignore[no-untyped-def]
        if isinstance(msg, wire.TaskCopy) and msg.task_id == self.held:
            self.copies += 1
            if self.copies == 2:
                return TaskCopied(peer, msg.task_id, False, "OperationalError: busy"), b""
            self.waiting.set()
            await self.gate.wait()
        env = Envelope(msg, ACTING, Epoch(1), "test", payload=payload)
        copy = isinstance(msg, wire.TaskCopy)
        handler = self.standby.on_copy if copy else self.standby.on_settled
        return await handler(ACTING, env)

    async def send(self, peer, msg, payload=b"", **kw):  # type: ignore[no-untyped-def]
        env = Envelope(msg, ACTING, Epoch(1), "test", payload=payload)
        if isinstance(msg, wire.TaskCheckpoint):
            await self.standby.on_checkpoint(ACTING, env)
        elif isinstance(msg, wire.TaskSettled):
            await self.standby.on_settled(ACTING, env)


def linked(tmp_path: Path, held: str = "") -> tuple[TaskReplicas, TaskReplicas, Link]:
    """An acting gateway and its standby S1, over a `Link`."""
    standby, _ = acting(tmp_path / "s1", [ACTING, S1], {})
    standby.node = S1
    link = Link(standby, held)
    r, _ = acting(tmp_path, [ACTING, S1], {})
    r._transport = link  # type: ignore[assignment]
    return r, standby, link


async def test_a_cancel_a_standby_answered_mid_catch_up_is_not_undone_by_it(
    tmp_path: Path,
) -> None:
    """The standby answered the cancel of a task the catch-up had not copied to it yet
    (its end matched no task there), then took the catch-up's copy, queued; the
    catch-up's results, which would have corrected it, broke off at a refused copy: a
    failover then ran the task its client was told was cancelled (a review)."""
    r, standby, link = linked(tmp_path, held="t3")
    try:
        fill(r, unfinished=4, finished=0)
        resync = asyncio.create_task(r.resync(S1, no_adoption))
        await asyncio.wait_for(link.waiting.wait(), 5)
        cancel = TaskState(TaskStatus.CANCELLED)
        r.store.finish(RequestId("t3"), cancel, None)
        await r.cancelled(RequestId("t3"), cancel)  # the client is told "cancelled"
        link.gate.set()
        # not done: a results copy was refused, so it is tried again, after a wait
        assert not await asyncio.wait_for(resync, 5)
        held = standby.store.get("t3")
        assert held is not None and held.state.status is TaskStatus.CANCELLED, held
        assert "t3" not in {t.task_id for t in standby.store.requeue_unfinished()}
    finally:
        r.close()
        standby.close()


async def test_a_standby_away_for_more_than_the_catch_ups_results_knows_the_rest_ended(
    tmp_path: Path,
) -> None:
    """Given the newest `RESYNC_RESULTS` results only, the standby that acted next
    answered an older task's id as one never handed out (404, "ids come from POST
    /inference"); it now holds their ends, and says where the result is."""
    r, standby, _ = linked(tmp_path)
    try:
        n = RESYNC_RESULTS + 2
        fill(r, unfinished=0, finished=n)  # t0 finished first
        assert await r.resync(S1, no_adoption)
        assert standby.store.get("t0") is None and standby.store.get(f"t{n - 1}") is not None
        scheduler = Scheduler(engine=None, store=standby.store)  # type: ignore[arg-type]
        with pytest.raises(TaskNotHeld, match="'t0' was accepted and failed on another"):
            await scheduler.snapshot("t0")
        with pytest.raises(TaskNotFound, match="ids come from POST /inference"):
            await scheduler.snapshot("never")
    finally:
        r.close()
        standby.close()


def test_a_pulled_task_whose_end_came_first_is_kept_ended_and_not_run(tmp_path: Path) -> None:
    """A gateway starting to act pulls from a standby a task whose cancel reached it first
    (kept in `ends`): the copy takes that end, and `take` hands it to no one to run. It
    was handed on queued: run, its end refused by the store, while the scheduler told
    the standbys "completed" (a review)."""
    store = TaskStore(tmp_path / "acting.sqlite")
    try:
        store.finish(RequestId("c"), TaskState(TaskStatus.CANCELLED, "by its client"), None)
        task = InferenceTask(RequestId("c"), (1, 2), max_new_tokens=4)
        assert take(store, ["c", task_to_json(task), None]) == (True, None)
        held = store.get("c")
        assert held is not None and held.state == TaskState(TaskStatus.CANCELLED, "by its client")
        fresh = InferenceTask(RequestId("q"), (3,), max_new_tokens=4)  # no end: run it
        assert take(store, ["q", task_to_json(fresh), None]) == (True, fresh)
    finally:
        store.close()
