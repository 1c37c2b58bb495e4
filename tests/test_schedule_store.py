"""The SQLite task store and the bounded queue."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from butterfly.schedule.queue import QueuePolicy, TaskQueue
from butterfly.schedule.state import TaskState, TaskStatus
from butterfly.schedule.store import (
    CACHE_KIB,
    Checkpoint,
    TaskStore,
    result_from_json,
    result_to_json,
    task_from_json,
    task_to_json,
)
from butterfly.types.errors import QueueFull, StoreUnusable, TaskAlreadyExists
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import (
    InferenceResult,
    InferenceTask,
    Sampled,
    SamplingParams,
    StageRecord,
)


def task(name: str, priority: int = 0) -> InferenceTask:
    return InferenceTask(
        task_id=RequestId(name),
        input_ids=(256, 72, 105),
        max_new_tokens=5,
        sampling=SamplingParams(0.7, 20, 0.9, 1234),
        priority=priority,
        created_at=1700000000.5,
    )


RESULT = InferenceResult(
    task_id=RequestId("a"),
    output_ids=(1, 2, 3),
    text="hey",
    stages=(StageRecord(NodeId(0), LayerRange(0, 2)), StageRecord(NodeId(1), LayerRange(2, 4))),
    timings={"total_s": 0.25},
)


def test_tasks_and_results_survive_reopening(tmp_path: Path) -> None:
    db = tmp_path / "data" / "tasks.sqlite"
    store = TaskStore(db)
    for name in ("a", "b", "c", "d"):
        store.add(task(name, priority=ord(name)))
    store.finish(RequestId("a"), TaskState(TaskStatus.COMPLETED), RESULT)
    store.finish(RequestId("c"), TaskState(TaskStatus.FAILED, "boom", "invalid_input"), None)
    store.close()

    reopened = TaskStore(db)
    assert [t.task_id for t in reopened.recovered] == ["b", "d"]  # acceptance order
    assert reopened.recovered[0] == task("b", priority=ord("b"))  # every field round-trips
    done = reopened.get("a")
    assert done is not None and done.result == RESULT
    assert done.state == TaskState(TaskStatus.COMPLETED)
    failed = reopened.get("c")
    assert failed is not None and failed.state.reason == "boom"
    assert failed.state.error_type == "invalid_input" and failed.result is None
    assert reopened.get("nope") is None
    assert reopened.counts() == {
        TaskStatus.COMPLETED: 1,
        TaskStatus.FAILED: 1,
        TaskStatus.QUEUED: 2,
    }
    reopened.close()


def test_one_grouped_write_keeps_every_write_but_a_refused_add(tmp_path: Path) -> None:
    """The scheduler's group commit: adds and finishes of one loop turn in one commit; a
    taken id is refused on its own, and everything else in the group still commits."""
    db = tmp_path / "t.sqlite"
    store = TaskStore(db)
    store.add(task("a"))
    refused = store.write(
        [task("b"), task("a"), task("c")],
        [(RequestId("a"), TaskState(TaskStatus.COMPLETED), RESULT)],
    )
    assert [type(r) for r in refused] == [type(None), TaskAlreadyExists, type(None)]
    store.close()
    reopened = TaskStore(db)
    assert [t.task_id for t in reopened.recovered] == ["b", "c"]
    done = reopened.get("a")
    assert done is not None and done.result == RESULT
    reopened.close()


def test_store_uses_wal_and_refuses_duplicates(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "t.sqlite")
    store.add(task("x"))
    with pytest.raises(TaskAlreadyExists):
        store.add(task("x"))
    store.close()
    with sqlite3.connect(tmp_path / "t.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    TaskStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreUnusable, match="newer Butterfly"):
        TaskStore(path)


def test_store_names_a_corrupt_file_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    path.write_bytes(b"this is not a database " * 200)
    with pytest.raises(StoreUnusable, match="move it aside") as caught:
        TaskStore(path)
    assert str(path) in str(caught.value)


def test_evictions_are_recorded_once_and_survive_a_reopen(tmp_path: Path) -> None:
    """A restarted gateway reads back whom it evicted; evicting twice is one record, with
    the first reason (the one the agreement recorded too)."""
    path = tmp_path / "t.sqlite"
    store = TaskStore(path)
    assert store.record_eviction(NodeId(2), "signed two results") is True
    assert store.record_eviction(NodeId(2), "again") is False
    assert store.record_eviction(NodeId(3), "equivocated") is True
    store.close()
    reopened = TaskStore(path)
    assert reopened.evictions() == {NodeId(2): "signed two results", NodeId(3): "equivocated"}
    reopened.close()


def test_a_version_1_file_gains_the_evictions_table(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    TaskStore(path).close()
    with sqlite3.connect(path) as db:  # as a version-1 gateway left it
        db.execute("DROP TABLE evictions")
        db.execute("PRAGMA user_version=1")
    store = TaskStore(path)
    assert store.evictions() == {} and store.record_eviction(NodeId(1), "lied")
    store.close()


def drain(q: TaskQueue) -> list[str]:
    out = []
    while (t := q.pop()) is not None:
        out.append(t.task_id)
    return out


def test_fifo_keeps_arrival_order_whatever_the_priority() -> None:
    q = TaskQueue(10, QueuePolicy.FIFO)
    for name, prio in [("a", 0), ("b", 9), ("c", 3)]:
        q.push(task(name, prio))
    assert drain(q) == ["a", "b", "c"]


def test_priority_runs_high_first_and_fifo_among_equals() -> None:
    q = TaskQueue(10, QueuePolicy.PRIORITY)
    for name, prio in [("a", 0), ("b", 5), ("c", 1), ("d", 5), ("e", -2)]:
        q.push(task(name, prio))
    assert q.position("d") == 1
    assert drain(q) == ["b", "d", "c", "a", "e"]


def test_queue_bound_refuses_unless_forced() -> None:
    q = TaskQueue(2)
    q.push(task("a"))
    q.push(task("b"))
    with pytest.raises(QueueFull, match="2 tasks"):
        q.push(task("c"))
    q.push(task("recovered"), force=True)  # accepted before a restart: never dropped
    assert len(q) == 3


def test_removed_tasks_never_pop() -> None:
    q = TaskQueue(100, QueuePolicy.PRIORITY)
    for i in range(50):
        q.push(task(f"t{i}", priority=i % 3))
    for i in range(0, 50, 2):
        assert q.remove(f"t{i}") is not None
    assert q.remove("t0") is None
    expected = sorted(range(1, 50, 2), key=lambda i: (-(i % 3), i))
    assert drain(q) == [f"t{i}" for i in expected]
    assert len(q) == 0 and q.pop() is None


def test_a_requeued_task_takes_its_new_place() -> None:
    q = TaskQueue(10, QueuePolicy.FIFO)
    for name in ("a", "b", "c"):
        q.push(task(name))
    q.remove("a")
    q.push(task("a"))  # its stale heap entry must not pop it ahead of b and c
    assert drain(q) == ["b", "c", "a"]


def test_prune_deletes_only_tasks_finished_before_the_cutoff(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "t.sqlite")
    for name in ("old-done", "old-failed", "queued", "new-done"):
        store.add(task(name))
    store.finish(RequestId("old-done"), TaskState(TaskStatus.COMPLETED), RESULT)
    store.finish(RequestId("old-failed"), TaskState(TaskStatus.FAILED, "boom"), None)
    cutoff = time.time() + 0.001
    time.sleep(0.01)
    store.finish(RequestId("new-done"), TaskState(TaskStatus.CANCELLED), None)
    assert sorted(store.prune(cutoff)) == ["old-done", "old-failed"]
    assert store.get("old-done") is None and store.get("old-failed") is None
    assert store.get("new-done") is not None
    assert store.prune(time.time() + 3600) == ["new-done"]
    got = store.get("queued")  # never pruned, however old: it has not run yet
    assert got is not None and got.state.status is TaskStatus.QUEUED
    store.close()


def test_a_standby_copy_keeps_the_latest_checkpoint_until_the_task_ends(tmp_path: Path) -> None:
    """What a standby gateway holds (wiring.standby): a copied task (twice is once), its
    latest checkpoint, none once the task ended; re-queued when it takes over."""
    store = TaskStore(tmp_path / "standby.sqlite")
    try:
        a, b = task("a"), task("b")
        store.copy(a)
        store.copy(a)  # a retried copy is the same task
        store.copy(b)
        store.save_checkpoint(a.task_id, Checkpoint((1, 2), b"rng-1", 3))
        store.save_checkpoint(a.task_id, Checkpoint((1, 2, 3, 4), b"rng-2", 4))
        store.save_checkpoint(RequestId("unknown"), Checkpoint((9,), b"x", 1))
        assert store.checkpoint(a.task_id) == Checkpoint((1, 2, 3, 4), b"rng-2", 4)
        assert store.checkpoint("unknown") is None  # no task, no checkpoint
        store.finish(b.task_id, TaskState(TaskStatus.COMPLETED), RESULT)
        store.save_checkpoint(b.task_id, Checkpoint((5,), b"late", 4))  # after its end
        assert store.checkpoint(b.task_id) is None
        assert [t.task_id for t in store.requeue_unfinished()] == ["a"]
        store.write(finishes=[(a.task_id, TaskState(TaskStatus.COMPLETED), RESULT)])
        assert store.checkpoint(a.task_id) is None and store.requeue_unfinished() == ()
    finally:
        store.close()


def test_a_retractions_empty_checkpoint_replaces_the_withdrawn_runs_and_stays(
    tmp_path: Path,
) -> None:
    """After an audit withdrew a run's tokens (it caught a liar), the engine saves an
    empty checkpoint of the next attempt: it replaces the withdrawn run's longer one in
    the same epoch, and no checkpoint of the withdrawn run (a late copy, a catch-up)
    replaces it again; the new run's own go on replacing it as usual. Without attempts,
    a successor resumed the withdrawn run's tokens (a review)."""
    store = TaskStore(tmp_path / "standby.sqlite")
    try:
        a = task("a")
        store.copy(a)
        store.save_checkpoint(a.task_id, Checkpoint((1, 2, 3, 4), b"lie", 3))
        store.save_checkpoint(a.task_id, Checkpoint((), b"fresh", 3, attempt=1))
        assert store.checkpoint(a.task_id) == Checkpoint((), b"fresh", 3, 1)
        store.save_checkpoint(a.task_id, Checkpoint((1, 2, 3, 4, 5), b"late", 4))  # attempt 0
        assert store.checkpoint(a.task_id) == Checkpoint((), b"fresh", 3, 1)
        store.save_checkpoint(a.task_id, Checkpoint((7,), b"honest", 4, attempt=1))
        assert store.checkpoint(a.task_id) == Checkpoint((7,), b"honest", 4, 1)
        [(_, held)] = store.unfinished()
        assert held == Checkpoint((7,), b"honest", 4, 1)
    finally:
        store.close()


def test_a_version_3_file_gains_the_checkpoints_attempt(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    store = TaskStore(path)
    store.add(task("a"))
    store.close()
    with sqlite3.connect(path) as db:  # as a version-3 gateway left it, mid-request
        db.execute("DROP TABLE checkpoints")
        db.execute(
            "CREATE TABLE checkpoints (task_id TEXT PRIMARY KEY, tokens TEXT NOT NULL, "
            "rng BLOB NOT NULL, epoch INTEGER NOT NULL)"
        )
        db.execute("INSERT INTO checkpoints VALUES ('a', '[5, 6]', x'00', 2)")
        db.execute("PRAGMA user_version=3")
    store = TaskStore(path)
    try:
        assert store.checkpoint("a") == Checkpoint((5, 6), b"\x00", 2, 0)
        store.save_checkpoint(RequestId("a"), Checkpoint((), b"fresh", 2, attempt=1))
        assert store.checkpoint("a") == Checkpoint((), b"fresh", 2, 1)
    finally:
        store.close()


def test_penalties_logprobs_and_their_results_survive_the_store() -> None:
    """What the standby copies and a restart reads back: the OpenAI sampling fields, and
    the logprobs of a finished result; a task written before those fields reads with
    their defaults."""
    sampling = SamplingParams(
        0.7, 5, 0.9, 3, presence_penalty=0.5, frequency_penalty=-1.0, logprobs=2
    )
    sampling = replace(sampling, prompt_logprobs=1, logit_bias=((3, -100.0), (70, 2.5)))
    task = InferenceTask(RequestId("t"), input_ids=(1, 2), stop=("END", "\n\n"), sampling=sampling)
    assert task_from_json("t", task_to_json(task)) == task
    new = task_to_json(InferenceTask(RequestId("t"), input_ids=(1,)))
    assert ", null, null, []]" in new
    old = new.replace(", 0.0, 0.0, null, null, []]", "]").replace('"stop": [], ', "")
    assert '"sampling": [0.0, 0, 1.0, null]' in old and "stop" not in old  # before them
    assert task_from_json("t", old) == InferenceTask(RequestId("t"), input_ids=(1,))
    seven = new.replace(", null, null, []]", ", null]")  # penalties and logprobs, no prompt's
    assert task_from_json("t", seven).sampling == SamplingParams()
    eight = new.replace(", []]", "]")  # no logit bias
    assert task_from_json("t", eight).sampling == SamplingParams()
    scored = (Sampled(4, -0.5, ((4, -0.5), (9, -1.5))), Sampled(7, -2.0, ((3, -1.0), (7, -2.0))))
    result = InferenceResult(
        RequestId("t"), output_ids=(4, 7), logprobs=scored, prompt_logprobs=scored[:1]
    )
    assert result_from_json("t", result_to_json(result)) == result


STORE_PROBE = """
import ctypes, ctypes.util, os, sys, tempfile
from pathlib import Path
from butterfly.schedule.state import TaskState, TaskStatus
from butterfly.schedule.store import TaskStore
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceResult, InferenceTask

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
if not hasattr(libc, "mallinfo2"):
    print("skip")
    sys.exit()
libc.mallinfo2.restype = MallInfo2
with tempfile.TemporaryDirectory() as d:
    store = TaskStore(Path(d) / "t.sqlite")
    before = libc.mallinfo2().uordblks
    for i in range(150):  # results of ~22 KB, as the soak's (signed records of 2 stages)
        rid = RequestId(f"t{i}")
        store.add(InferenceTask(rid, input_ids=tuple(range(5, 105)), max_new_tokens=32))
        proofs = tuple(os.urandom(600) for _ in range(36))
        result = InferenceResult(rid, output_ids=tuple(range(32)), proofs=proofs)
        store.finish(rid, TaskState(TaskStatus.COMPLETED), result)
    print(libc.mallinfo2().uordblks - before)
    store.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_the_stores_page_cache_stays_small_as_results_accumulate() -> None:
    """SQLite's default page cache (2000 KiB) filled with results written once and
    rarely read, over the first ~80 of them: the acting gateway grew by it for minutes
    (bench/soak.py). Checked in a fresh interpreter, whose heap is this store's alone."""
    out = subprocess.run(
        [sys.executable, "-c", STORE_PROBE], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "skip":
        pytest.skip("a C library without mallinfo2")
    grew = int(out.stdout)
    assert grew < (CACHE_KIB + 512) * 1024, f"the heap grew {grew / 2**20:.2f} MiB"


KILLED_AFTER_COMMIT = """
import os, signal, sys
from pathlib import Path
from butterfly.schedule.state import TaskState, TaskStatus
from butterfly.schedule.store import TaskStore
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask

store = TaskStore(Path(sys.argv[1]))
store.add(InferenceTask(RequestId("accepted"), input_ids=(1, 2)))  # the API's 202 path
store.write(  # the scheduler's grouped commit: one more task and a finish
    adds=[InferenceTask(RequestId("grouped"), input_ids=(3,))],
    finishes=[(RequestId("accepted"), TaskState(TaskStatus.FAILED, "why", "e"), None)],
)
os.kill(os.getpid(), signal.SIGKILL)  # right after the commit returned: no close, no exit
"""


def test_a_committed_task_survives_the_process_being_killed(tmp_path: Path) -> None:
    """README: an accepted task survives the gateway process crashing (WAL,
    synchronous=NORMAL). The child commits through the store and SIGKILLs itself the
    moment the commit returns, so nothing after it (a close, a checkpoint of the WAL
    into the file, the interpreter's exit) runs."""
    path = tmp_path / "tasks.sqlite"
    src = Path(__file__).resolve().parents[1] / "src"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_COMMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=60,  # run() kills the child by its PID on expiry
        cwd=src,
        check=False,
    )
    assert done.returncode == -9, done.stderr  # killed, not ended on its own
    assert path.with_name("tasks.sqlite-wal").stat().st_size > 0  # the commits are in the WAL
    store = TaskStore(path)
    try:
        accepted, grouped = store.get("accepted"), store.get("grouped")
        assert accepted is not None and accepted.state.status is TaskStatus.FAILED
        assert grouped is not None and grouped.task.input_ids == (3,)
        assert [t.task_id for t in store.recovered] == ["grouped"]  # queued again
    finally:
        store.close()


def test_a_finished_task_keeps_its_first_end(tmp_path: Path) -> None:
    """A completed task with its result stays so when another end arrives (a gateway
    that held it queued, away meanwhile, ran or cancelled it again): it became "failed"
    or "cancelled", its result gone, on the store its clients read (a review)."""
    store = TaskStore(tmp_path / "tasks.sqlite")
    try:
        store.add(task("a"))
        store.finish(RequestId("a"), TaskState(TaskStatus.COMPLETED), RESULT)
        store.finish(RequestId("a"), TaskState(TaskStatus.FAILED, "ran again", "E"), None)
        store.write((), [(RequestId("a"), TaskState(TaskStatus.CANCELLED), None)])
        held = store.get("a")
        assert held is not None
        assert (held.state.status, held.result) == (TaskStatus.COMPLETED, RESULT)
    finally:
        store.close()


def test_an_end_that_comes_before_its_task_is_the_tasks_once_it_comes(tmp_path: Path) -> None:
    """A standby answered a cancel of a task the acting gateway's catch-up had not copied
    to it yet, then took the copy as queued, and would have run it after a failover (a
    review). A completed end without its result is an end only where no task is held:
    written over a task, it would answer "completed" with no result for good, where
    the task run again gives its result again."""
    store = TaskStore(tmp_path / "standby.sqlite")
    try:
        store.finish(RequestId("c"), TaskState(TaskStatus.CANCELLED, "by its client"), None)
        store.finish(RequestId("c"), TaskState(TaskStatus.FAILED, "later", "E"), None)
        store.finish(RequestId("r"), TaskState(TaskStatus.COMPLETED), RESULT)
        store.finish(RequestId("n"), TaskState(TaskStatus.COMPLETED), None)
        assert store.get("c") is None
        assert store.ended("c") == TaskState(TaskStatus.CANCELLED, "by its client")
        assert store.ended("n") == TaskState(TaskStatus.COMPLETED)
        store.copy(task("c"))
        store.write([task("r"), task("n")])
        assert store.ended("c") is None and store.ended("n") is None
        ends = {name: store.get(name) for name in ("c", "r", "n")}
        assert {k: v.state.status for k, v in ends.items() if v} == {
            "c": TaskStatus.CANCELLED,
            "r": TaskStatus.COMPLETED,
            "n": TaskStatus.QUEUED,
        }
        assert ends["r"] is not None and ends["r"].result == replace(RESULT, task_id="r")
        store.finish(RequestId("n"), TaskState(TaskStatus.COMPLETED), None)  # held: no
        assert [t.task_id for t in store.requeue_unfinished()] == ["n"]
        store.finish(RequestId("gone"), TaskState(TaskStatus.FAILED, "x", "E"), None)
        assert "gone" in store.prune(time.time() + 1) and store.ended("gone") is None
    finally:
        store.close()
