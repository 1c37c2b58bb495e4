"""Accepted tasks and their results in a SQLite file, so a gateway restart loses neither;
and the nodes the gateway evicted, so a restart does not forget them either.

The contract with clients is "once you have a task id, the task runs and its result stays
readable". So a task is written (and committed) before the 202 that hands out its id, its
result is written before anyone is told it finished, and on open every task that was
queued or running is handed back for re-queueing, in the order it was accepted.

WAL mode lets readers (status lookups) proceed while a writer commits. With
`synchronous="NORMAL"` (the default) a commit survives the process being killed, the
failure the gateway guards against; `"FULL"` also survives the machine losing power, at
the cost of an fsync per commit.

The methods are synchronous and guarded by a lock. The scheduler writes inline on its
event loop (a WAL commit without fsync costs ~0.1-0.3 ms, less than a hop to a thread and
back) and groups the writes of one loop turn into one commit (`write`); reads go
through `asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from butterfly.schedule.state import TERMINAL, TaskState, TaskStatus
from butterfly.types.errors import StoreUnusable, TaskAlreadyExists
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import (
    InferenceResult,
    InferenceTask,
    Sampled,
    SamplingParams,
    StageRecord,
)

CACHE_KIB = 512
"""SQLite's page cache for the file, per connection (its default is 2000 KiB). The pages
are mostly results written once and read back rarely (fresh ones come from the
scheduler's memory), so the default cache only fills: 2 MB over the first ~80 results
of 22 KB, 5 minutes of bench/soak.py's load, a slope on the acting gateway. At 512 KiB:
0.5 MB; 1500 tasks added, finished and sometimes read cost 515 us a task against 501
(medians of 5 rounds, ranges overlapping)."""

SCHEMA_VERSION = 4
"""2 added `evictions`: an older gateway would open the file and forget them, so it may
not (version 1 files gain the table when opened). 3 added `checkpoints`, 4 their
`attempt` (version 3 files gain the column when opened). `ends` came within 4 (files
gain the table when opened): an older node ignores it and loses only what it adds, so
it may still open the file."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- acceptance order, for FIFO after a restart
    task_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    error_type TEXT NOT NULL DEFAULT '',
    task TEXT NOT NULL,                      -- JSON, see task_to_json
    result TEXT,                             -- JSON once completed, see result_to_json
    accepted_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status);
CREATE TABLE IF NOT EXISTS checkpoints (
    task_id TEXT PRIMARY KEY,                -- a running task's latest checkpoint
    tokens TEXT NOT NULL,                    -- JSON list of the token ids sampled so far
    rng BLOB NOT NULL,                       -- the sampling RNG's state after the last
    epoch INTEGER NOT NULL,                  -- the plan epoch they were sampled in
    attempt INTEGER NOT NULL DEFAULT 0       -- the run: an audit's retraction starts another
);
CREATE INDEX IF NOT EXISTS tasks_finished_at ON tasks (finished_at);
CREATE TABLE IF NOT EXISTS ends (
    task_id TEXT PRIMARY KEY,                -- the end of a task this store does not hold
    status TEXT NOT NULL,                    -- (yet): see END_ELSEWHERE
    reason TEXT NOT NULL,
    error_type TEXT NOT NULL,
    result TEXT,                             -- JSON, or null: not copied here
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evictions (
    node INTEGER PRIMARY KEY,                -- one record per node: evicting twice is one
    reason TEXT NOT NULL,                    -- the first reason given
    evicted_at REAL NOT NULL
);
"""


_DONE = ", ".join(f"'{status.value}'" for status in TERMINAL)
_KEEPS = f"tasks.status NOT IN ({_DONE})"
_CARRIES = "(:result IS NOT NULL OR :status != 'completed')"
FINISH = (
    "UPDATE tasks SET status = :status, reason = :reason, error_type = :error_type, "
    f"result = :result, finished_at = :now WHERE task_id = :task_id AND {_KEEPS} AND {_CARRIES}"
)
"""A task's end, written only over an unfinished state: the first end a store holds is
the task's, whatever arrives later. A standby's completed task (with the result its
clients read) became "failed" or "cancelled" when a gateway that had held it queued,
away meanwhile, ran or cancelled it again and sent its own end (a review). And never a
completed end without its result (`END_ELSEWHERE`): the task stays unfinished, so a
gateway acting later runs it again, with its stored seed, and has its result again."""
END_ELSEWHERE = (
    "INSERT OR IGNORE INTO ends (task_id, status, reason, error_type, result, finished_at) "
    "SELECT :task_id, :status, :reason, :error_type, :result, :now "
    "WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE task_id = :task_id)"
)
"""The end of a task this store does not hold, kept (the first one) until the task comes:
a standby answered a cancel of a task the acting gateway's catch-up had not copied to it
yet, then took the copy, queued, and would have run it after a failover (a review). A
standby away while more than the catch-up's results finished is sent the older ones'
ends without their results (`wiring.standby.TaskReplicas.resync`): its store then knows
that those tasks were accepted and ended, and says so (`ended`) rather than that no such
task exists."""
END_ARRIVED = (
    "UPDATE tasks SET status = e.status, reason = e.reason, error_type = e.error_type, "
    "result = e.result, finished_at = e.finished_at FROM ends AS e "
    f"WHERE e.task_id = tasks.task_id AND tasks.task_id = :task_id AND {_KEEPS} "
    "AND (e.result IS NOT NULL OR e.status != 'completed')"
)
"""A task added or copied here takes the end kept for it (`END_ELSEWHERE`), but for a
completed end without its result (`FINISH`)."""


@dataclass(frozen=True)
class Checkpoint:
    """A generation so far: resuming from it gives exactly the tokens the uninterrupted
    run would have (the RNG state is the one after the last token sampled)."""

    tokens: tuple[int, ...]
    rng_state: bytes
    epoch: int
    attempt: int = 0
    """The run of the request: an audit that withdraws a run's tokens (it caught a liar)
    starts the next with an empty checkpoint of the next attempt, and a checkpoint of an
    earlier attempt never replaces it (a successor resumed a withdrawn run: a review)."""


@dataclass(frozen=True)
class StoredTask:
    task: InferenceTask
    state: TaskState
    result: InferenceResult | None


def task_to_json(task: InferenceTask) -> str:
    s = task.sampling
    return json.dumps(
        {
            "input_ids": list(task.input_ids),
            "input_vector": list(task.input_vector),
            "max_new_tokens": task.max_new_tokens,
            "stop": list(task.stop),
            "sampling": [
                *(s.temperature, s.top_k, s.top_p, s.seed),
                *(s.presence_penalty, s.frequency_penalty, s.logprobs, s.prompt_logprobs),
                [list(pair) for pair in s.logit_bias],
            ],
            "priority": task.priority,
            "created_at": task.created_at,
        }
    )


def task_from_json(task_id: str, text: str) -> InferenceTask:
    d = json.loads(text)
    # the penalties and logprobs came later, prompt logprobs and stops after them, the
    # logit bias last: a file written before has four sampling fields, or seven, or eight
    fields: list[Any] = d["sampling"]
    temperature, top_k, top_p, seed, *rest = fields
    later: tuple[Any, ...] = (0.0, 0.0, None, None, [])  # the defaults of the later fields
    presence, frequency, logprobs, prompt_logprobs, bias = (*rest, *later[len(rest) :])
    sampling = SamplingParams(
        *(temperature, top_k, top_p, seed, presence, frequency, logprobs, prompt_logprobs),
        logit_bias=tuple((int(token), float(value)) for token, value in bias),
    )
    return InferenceTask(
        task_id=RequestId(task_id),
        input_ids=tuple(d["input_ids"]),
        input_vector=tuple(d["input_vector"]),
        max_new_tokens=d["max_new_tokens"],
        stop=tuple(d.get("stop", ())),
        sampling=sampling,
        priority=d["priority"],
        created_at=d["created_at"],
    )


def result_to_json(result: InferenceResult) -> str:
    return json.dumps(
        {
            "output_ids": list(result.output_ids),
            "output_vector": list(result.output_vector),
            "text": result.text,
            "verified": result.verified,
            "stages": [[s.node, s.layers.start, s.layers.end] for s in result.stages],
            "timings": result.timings,
            "proofs": [base64.b64encode(p).decode() for p in result.proofs],
            "logprobs": [_scored(s) for s in result.logprobs],
            "prompt_logprobs": [_scored(s) for s in result.prompt_logprobs],
        }
    )


def result_from_json(task_id: str, text: str) -> InferenceResult:
    d: dict[str, Any] = json.loads(text)
    return InferenceResult(
        task_id=RequestId(task_id),
        output_ids=tuple(d["output_ids"]),
        output_vector=tuple(d["output_vector"]),
        text=d["text"],
        verified=d["verified"],
        stages=tuple(StageRecord(NodeId(n), LayerRange(a, b)) for n, a, b in d["stages"]),
        timings=dict(d["timings"]),
        proofs=tuple(base64.b64decode(p) for p in d.get("proofs", ())),
        logprobs=tuple(_sampled(e) for e in d.get("logprobs", ())),
        prompt_logprobs=tuple(_sampled(e) for e in d.get("prompt_logprobs", ())),
    )


def _scored(s: Sampled) -> list[Any]:
    return [s.token, s.logprob, [list(t) for t in s.top]]


def _sampled(entry: list[Any]) -> Sampled:
    token, logprob, top = entry
    return Sampled(token, logprob, tuple((a, b) for a, b in top))


def unusable(path: Path, error: sqlite3.Error) -> str:
    """What the operator does about a task store SQLite cannot open."""
    if "locked" in str(error) or "busy" in str(error):
        fix = "another process holds it (a second node on this data directory?): stop it"
    else:
        fix = "restore it from a backup, or move it aside to start with no tasks"
    return f"the task store {path} cannot be used ({error}); {fix}"


class TaskStore:
    """One SQLite file of tasks; open it once per process (it is not shared between
    gateways: SQLite's locking is not meant for that, and two gateways re-running the
    same recovered task would run it twice)."""

    def __init__(self, path: Path, *, synchronous: Literal["NORMAL", "FULL"] = "NORMAL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._open(synchronous)
        except sqlite3.Error as e:
            self._db.close()
            raise StoreUnusable(unusable(self.path, e)) from e
        except StoreUnusable:
            self._db.close()
            raise

    def _open(self, synchronous: str) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        with self._db:
            self._db.execute("BEGIN")
            self._create_schema()
        self.recovered = self._recover()

    def _create_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnusable(
                f"{self.path} was written by a newer Butterfly (schema {version}, this one "
                f"reads {SCHEMA_VERSION}); upgrade, or point the node at another data directory"
            )
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(checkpoints)")}
        if "attempt" not in columns:  # a version 3 file
            self._db.execute(
                "ALTER TABLE checkpoints ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0"
            )
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _recover(self) -> tuple[InferenceTask, ...]:
        """Mark every unfinished task queued again and return them in acceptance order."""
        done = tuple(s.value for s in TERMINAL)
        marks = ",".join("?" * len(done))
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                f"UPDATE tasks SET status = ? WHERE status NOT IN ({marks})",
                (TaskStatus.QUEUED.value, *done),
            )
            rows = self._db.execute(
                f"SELECT task_id, task FROM tasks WHERE status NOT IN ({marks}) ORDER BY seq",
                done,
            ).fetchall()
        return tuple(task_from_json(task_id, text) for task_id, text in rows)

    def requeue_unfinished(self) -> tuple[InferenceTask, ...]:
        """Mark every unfinished task queued again (`recovered` lists them): a standby
        about to act as the gateway takes over what the last one had not finished."""
        self.recovered = self._recover()
        return self.recovered

    def copy(self, task: InferenceTask) -> None:
        """Keep a task the acting gateway accepted (a standby's copy); a second copy of
        one task is the same task, not an error. An end that came first is its end."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR IGNORE INTO tasks (task_id, status, task, accepted_at) "
                "VALUES (?, ?, ?, ?)",
                (task.task_id, TaskStatus.QUEUED.value, task_to_json(task), time.time()),
            )
            self._take_ends([task.task_id])

    def save_checkpoint(self, task_id: RequestId, checkpoint: Checkpoint) -> None:
        """Replace the task's checkpoint with a later one, unless the task is unknown or
        has finished. Later: of a later attempt (a run after a failed audit starts over,
        with an empty checkpoint, which must replace the withdrawn run's), or of the same
        attempt and a later plan epoch, or as long at least in the same epoch; so a copy
        that arrives late (a standby's catch-up) never replaces a newer one."""
        terminal = tuple(status.value for status in TERMINAL)
        marks = ", ".join("?" * len(terminal))
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO checkpoints (task_id, tokens, rng, epoch, attempt) "
                f"SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM tasks WHERE task_id = ? "
                f"AND status NOT IN ({marks})) "
                "ON CONFLICT (task_id) DO UPDATE SET tokens = excluded.tokens, "
                "rng = excluded.rng, epoch = excluded.epoch, attempt = excluded.attempt "
                "WHERE excluded.attempt > attempt OR (excluded.attempt = attempt AND "
                "(excluded.epoch > epoch OR (excluded.epoch = epoch AND "
                "json_array_length(excluded.tokens) >= json_array_length(tokens))))",
                (
                    task_id,
                    json.dumps(list(checkpoint.tokens)),
                    checkpoint.rng_state,
                    checkpoint.epoch,
                    checkpoint.attempt,
                    task_id,
                    *terminal,
                ),
            )

    def unfinished(self) -> list[tuple[InferenceTask, Checkpoint | None]]:
        """Every task not finished, in acceptance order, with its checkpoint if any (what
        a standby that was away must be given)."""
        done = tuple(s.value for s in TERMINAL)
        marks = ",".join("?" * len(done))
        with self._lock:
            rows = self._db.execute(
                "SELECT t.task_id, t.task, c.tokens, c.rng, c.epoch, c.attempt FROM tasks t "
                "LEFT JOIN checkpoints c ON c.task_id = t.task_id "
                f"WHERE t.status NOT IN ({marks}) ORDER BY t.seq",
                done,
            ).fetchall()
        return [
            (
                task_from_json(task_id, text),
                None
                if tokens is None
                else Checkpoint(tuple(json.loads(tokens)), bytes(rng), epoch, attempt),
            )
            for task_id, text, tokens, rng, epoch, attempt in rows
        ]

    def recently_finished(self, limit: int) -> list[StoredTask]:
        """The `limit` tasks that finished last, newest first."""
        ids = self.finished_ids(0, limit)
        return [s for task_id, _ in ids if (s := self.get(task_id)) is not None]

    def checkpoint(self, task_id: str) -> Checkpoint | None:
        with self._lock:
            row = self._db.execute(
                "SELECT tokens, rng, epoch, attempt FROM checkpoints WHERE task_id = ?",
                (task_id,),
            ).fetchone()
        if row is None:
            return None
        tokens, rng, epoch, attempt = row
        return Checkpoint(tuple(json.loads(tokens)), bytes(rng), epoch, attempt)

    def add(self, task: InferenceTask) -> None:
        """Persist a newly accepted task as queued; committed when this returns."""
        try:
            with self._lock, self._db:
                self._db.execute(
                    "INSERT INTO tasks (task_id, status, task, accepted_at) VALUES (?, ?, ?, ?)",
                    (task.task_id, TaskStatus.QUEUED.value, task_to_json(task), time.time()),
                )
        except sqlite3.IntegrityError as e:
            raise TaskAlreadyExists(f"a task with id {task.task_id} already exists") from e

    def finish(self, task_id: RequestId, state: TaskState, result: InferenceResult | None) -> None:
        """Record a terminal state (and the result of a completed task) in one commit,
        unless the task has one already (`FINISH`)."""
        self.write((), [(task_id, state, result)])

    def write(
        self,
        adds: Sequence[InferenceTask] = (),
        finishes: Sequence[tuple[RequestId, TaskState, InferenceResult | None]] = (),
    ) -> list[TaskAlreadyExists | None]:
        """Accept `adds` (queued) and record `finishes` (terminal states) in one commit: the
        scheduler groups the writes of one turn of its event loop, one commit (one WAL
        append) for all of them instead of one per write. Returns, per add, None or the
        error refusing it (an id taken); the other writes still commit. A task that has
        a terminal state keeps it (`FINISH`)."""
        now = time.time()
        updates = [
            {
                "task_id": task_id,
                "status": state.status.value,
                "reason": state.reason,
                "error_type": state.error_type,
                "result": result_to_json(result) if result is not None else None,
                "now": now,
            }
            for task_id, state, result in finishes
        ]
        inserts = [(t.task_id, TaskStatus.QUEUED.value, task_to_json(t), now) for t in adds]
        refused: list[TaskAlreadyExists | None] = []
        with self._lock, self._db:
            self._db.execute("BEGIN")
            for row in inserts:  # a failed INSERT undoes itself, not the transaction
                try:
                    self._db.execute(
                        "INSERT INTO tasks (task_id, status, task, accepted_at) "
                        "VALUES (?, ?, ?, ?)",
                        row,
                    )
                    refused.append(None)
                except sqlite3.IntegrityError:
                    refused.append(TaskAlreadyExists(f"a task with id {row[0]} already exists"))
            added = zip(inserts, refused, strict=True)
            self._take_ends([row[0] for row, error in added if error is None])
            if updates:
                self._db.executemany(FINISH, updates)
                self._db.executemany(END_ELSEWHERE, updates)
                self._db.executemany(  # a finished task resumes from nothing
                    "DELETE FROM checkpoints WHERE task_id = ?", [(t,) for t, _, _ in finishes]
                )
        return refused

    def _take_ends(self, task_ids: Sequence[str]) -> None:
        """Within a write: tasks just added take the ends that came before them."""
        ids = [{"task_id": task_id} for task_id in task_ids]
        if ids and self._db.execute("SELECT 1 FROM ends LIMIT 1").fetchone() is not None:
            self._db.executemany(END_ARRIVED, ids)
            self._db.executemany("DELETE FROM ends WHERE task_id = :task_id", ids)

    def ended(self, task_id: str) -> TaskState | None:
        """The end kept for a task this store does not hold (`END_ELSEWHERE`), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT status, reason, error_type FROM ends WHERE task_id = ?", (task_id,)
            ).fetchone()
        return None if row is None else TaskState(TaskStatus(row[0]), row[1], row[2])

    def finished_ids(self, skip: int, limit: int) -> list[tuple[RequestId, TaskState]]:
        """Up to `limit` finished tasks after the `skip` that finished last, newest first:
        id and end (what `recently_finished` leaves out)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id, status, reason, error_type FROM tasks "
                f"WHERE status IN ({_DONE}) ORDER BY finished_at DESC LIMIT ? OFFSET ?",
                (limit, skip),
            ).fetchall()
        return [(RequestId(t), TaskState(TaskStatus(s), r, e)) for t, s, r, e in rows]

    def get(self, task_id: str) -> StoredTask | None:
        with self._lock:
            row = self._db.execute(
                "SELECT status, reason, error_type, task, result FROM tasks WHERE task_id = ?",
                (task_id,),
            ).fetchone()
        if row is None:
            return None
        status, reason, error_type, task, result = row
        return StoredTask(
            task=task_from_json(task_id, task),
            state=TaskState(TaskStatus(status), reason, error_type),
            result=result_from_json(task_id, result) if result is not None else None,
        )

    def prune(self, finished_before: float) -> list[str]:
        """Delete tasks that finished (any terminal state) before `finished_before`, a
        `time.time()` value; returns their ids. Queued and running tasks are never pruned."""
        terminal = tuple(status.value for status in TERMINAL)
        marks = ", ".join("?" * len(terminal))
        with self._lock, self._db:
            rows = self._db.execute(
                f"DELETE FROM tasks WHERE finished_at < ? AND status IN ({marks}) "
                "RETURNING task_id",
                (finished_before, *terminal),
            ).fetchall()
            rows += self._db.execute(  # the ends of tasks never held here go with them
                "DELETE FROM ends WHERE finished_at < ? RETURNING task_id", (finished_before,)
            ).fetchall()
        return [task_id for (task_id,) in rows]

    def record_eviction(self, node: NodeId, reason: str) -> bool:
        """Remember that the gateway evicted `node`, committed when this returns, so a
        restarted gateway never plans with it again. True if it was not recorded yet."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO evictions (node, reason, evicted_at) VALUES (?, ?, ?)",
                (int(node), reason, time.time()),
            )
        return cursor.rowcount == 1

    def evictions(self) -> dict[NodeId, str]:
        """Every node this gateway evicted, with the first reason, in eviction order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT node, reason FROM evictions ORDER BY evicted_at, node"
            ).fetchall()
        return {NodeId(node): reason for node, reason in rows}

    def counts(self) -> dict[TaskStatus, int]:
        """Tasks per status, for health reports and tests."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall()
        return {TaskStatus(status): n for status, n in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


__all__ = ["Checkpoint", "StoredTask", "TaskStore"]
