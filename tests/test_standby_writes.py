"""A standby gateway's copies of the acting gateway's tasks: each copy is committed before
it is answered, and the copies and ends that arrive together share one commit
(butterfly.wiring.standby, butterfly.schedule.group_commit).

The acting gateway copies every accepted task before its 202 and sends its end when it
finishes, so under load a standby (which also runs a stage) received two SQLite commits
per request on its event loop; grouped, a burst of them costs one WAL commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from butterfly.control.gateway_role import GatewayRole
from butterfly.metrics.events import discard
from butterfly.net.conn import Reply
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.schedule.store import result_to_json, task_to_json
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.tasks import InferenceResult, InferenceTask
from butterfly.types.wire import standby as wire
from butterfly.types.wire.frames import Message
from butterfly.types.wire.standby import TaskCopied, TaskCopy, TaskSettled
from butterfly.wiring.standby import TaskReplicas

pytestmark = pytest.mark.timeout(60)
ACTING, STANDBY = NodeId(0), NodeId(1)
TASKS = 24
WAL_HEADER, FRAME_HEADER = 32, 24


def standby(path: Path) -> TaskReplicas:
    role = GatewayRole(gateways=[ACTING, STANDBY], status=lambda n: "healthy", evicted=tuple)
    return TaskReplicas(
        node=STANDBY,
        path=path,
        role=role,
        transport=MemoryNetwork().transport(STANDBY, discard),
        status=lambda n: "healthy",
        timeout_s=lambda: 1.0,
    )


def from_acting(msg: Message, payload: bytes = b"") -> Envelope:
    return Envelope(msg, ACTING, Epoch(1), "test", payload=payload)


def statuses(path: Path) -> dict[str, str]:
    """What another connection reads: only what was committed."""
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT task_id, status FROM tasks").fetchall())


def wal_frames(path: Path, page_size: int) -> int:
    wal = Path(f"{path}-wal")
    size = wal.stat().st_size if wal.exists() else 0
    return max(0, size - WAL_HEADER) // (FRAME_HEADER + page_size)


async def test_copies_are_committed_before_their_answer_and_a_burst_shares_a_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.db"
    replicas = standby(path)
    try:
        with sqlite3.connect(replicas.store.path) as db:
            page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        tasks = [
            InferenceTask(RequestId(f"task-{i}"), (1, 2, 3, i), max_new_tokens=4)
            for i in range(TASKS)
        ]
        before = wal_frames(path, page_size)

        async def copy(task: InferenceTask) -> tuple[Reply | None, str | None]:
            env = from_acting(TaskCopy(task.task_id), task_to_json(task).encode())
            reply = await replicas.on_copy(ACTING, env)
            return reply, statuses(path).get(task.task_id)  # read as soon as answered

        answers = await asyncio.gather(*(copy(t) for t in tasks))
        for reply, status in answers:
            assert reply is not None
            copied = reply[0]
            assert isinstance(copied, TaskCopied) and copied.ok, copied
            assert status == "queued"  # committed when the answer came
        grouped = wal_frames(path, page_size) - before
        # one commit per copy appends at least one page (frame) each: 24 or more
        assert 0 < grouped < TASKS // 2, grouped

        # a second copy of a task is the same task, not an error
        again = await replicas.on_copy(
            ACTING, from_acting(TaskCopy(tasks[0].task_id), task_to_json(tasks[0]).encode())
        )
        assert again is not None and isinstance(again[0], TaskCopied) and again[0].ok

        # the ends, grouped the same way
        await asyncio.gather(
            *(
                replicas.on_settled(ACTING, from_acting(TaskSettled(t.task_id, "failed", "x", "e")))
                for t in tasks
            )
        )
        assert set(statuses(path).values()) == {"failed"}
    finally:
        replicas.close()


async def test_a_copy_to_a_closed_standby_is_refused_not_lost(tmp_path: Path) -> None:
    replicas = standby(tmp_path / "tasks.db")
    replicas.close()
    task = InferenceTask(RequestId("late"), (1, 2), max_new_tokens=2)
    reply = await replicas.on_copy(
        ACTING, from_acting(TaskCopy(task.task_id), task_to_json(task).encode())
    )
    assert reply is not None and isinstance(reply[0], TaskCopied) and not reply[0].ok


class CircuitOpenFor:
    """A transport whose circuit to the standby is open for the first `refusals` asks
    (it came back, and the acting gateway's breaker has not let calls through yet)."""

    def __init__(self, refusals: int) -> None:
        self.refusals, self.asked = refusals, 0

    async def ask(self, peer: NodeId, msg: object, payload: bytes, **kw: object) -> object:
        from butterfly.types.errors import CircuitOpen

        self.asked += 1
        if self.asked <= self.refusals:
            raise CircuitOpen(f"circuit to node {peer} is open after repeated failures")
        return TaskCopied(NodeId(1), "t", True), b""


@pytest.mark.parametrize(("status", "held"), [("healthy", True), ("suspected", False)])
async def test_a_copy_waits_for_the_circuit_to_a_standby_the_detector_hears(
    tmp_path: Path, status: str, held: bool
) -> None:
    """The 202 went out with no standby holding the task while the acting gateway's
    circuit to a standby that had come back was still open, and the gateway's death
    right after lost the task (a review): a standby the detector calls healthy is
    tried again until the circuit lets the copy through; one it does not, is not."""
    role = GatewayRole(gateways=[ACTING, STANDBY], status=lambda n: status, evicted=tuple)
    transport = CircuitOpenFor(refusals=3)
    acting = TaskReplicas(
        node=ACTING,
        path=tmp_path / "acting.db",
        role=role,
        transport=transport,  # type: ignore[arg-type]
        status=lambda n: status,
        timeout_s=lambda: 2.0,
    )
    try:
        task = InferenceTask(RequestId("t"), input_ids=(1, 2), max_new_tokens=1)
        await acting.accepted(task)
        assert acting.copies == (1 if held else 0)
        assert transport.asked == (4 if held else 1)
    finally:
        acting.close()


async def test_a_standby_whose_store_fails_answers_an_error_and_goes_on(tmp_path: Path) -> None:
    """The disk fails under a standby (here its connection is gone): a sync is answered
    with the error rather than left unanswered for the asker's 5 s, a checkpoint is
    dropped (the next may be kept), and neither raises out of the handler."""
    replicas = standby(tmp_path / "tasks.db")
    try:
        replicas.store._db.close()
        reply = await replicas.on_sync(ACTING, from_acting(wire.TaskSync()))
        assert reply is not None and isinstance(reply[0], wire.TaskSyncReply)
        assert "ProgrammingError" in reply[0].error and reply[1] == b""
        checkpoint = wire.TaskCheckpoint(RequestId("t"), (1, 2), Epoch(1))
        assert await replicas.on_checkpoint(ACTING, from_acting(checkpoint, b"rng")) is None
    finally:
        replicas.close()


async def test_a_standby_keeps_a_completed_task_completed_whatever_end_comes_next(
    tmp_path: Path,
) -> None:
    """An acting gateway that held the task queued while this standby (acting then)
    completed it sends its own end on its re-run: the result clients read here stays."""
    replicas = standby(tmp_path / "tasks.db")
    try:
        task = InferenceTask(RequestId("t"), (1, 2), max_new_tokens=2)
        await replicas.on_copy(ACTING, from_acting(TaskCopy("t"), task_to_json(task).encode()))
        done = InferenceResult(RequestId("t"), output_ids=(5, 6), text="hi")
        completed = TaskSettled("t", "completed", "", "")
        await replicas.on_settled(ACTING, from_acting(completed, result_to_json(done).encode()))
        for end in (
            TaskSettled("t", "failed", "ran again", "E"),
            TaskSettled("t", "cancelled", "", ""),
        ):
            reply = await replicas.on_settled(ACTING, from_acting(end))
            assert reply is not None and isinstance(reply[0], TaskCopied) and reply[0].ok
        held = replicas.store.get("t")
        assert held is not None and held.state.status.value == "completed"
        assert held.result == done
    finally:
        replicas.close()
