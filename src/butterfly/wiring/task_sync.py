"""The records one gateway-capable node hands another in a `TaskSync` reply, both ways:
a standby's unfinished tasks (with their checkpoints) and recent results, and what the
gateway that asked takes of them into its store (`standby.TaskReplicas`).

A record is the task's id, its JSON, its checkpoint (tokens, RNG state in base64, epoch,
attempt; or None) and, for a finished task, its end: status, reason, error type and result JSON
(or None).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from typing import Any

from butterfly.schedule.state import TaskState, TaskStatus
from butterfly.schedule.store import (
    Checkpoint,
    StoredTask,
    TaskStore,
    result_from_json,
    result_to_json,
    task_from_json,
    task_to_json,
)
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.tasks import InferenceTask

log = logging.getLogger(__name__)
INT_SPAN = 1 << 63
"""Epochs, attempts and token ids are below this: SQLite's integers are 64-bit signed."""


def sync_payload(
    unfinished: Sequence[tuple[InferenceTask, Checkpoint | None]], finished: Sequence[StoredTask]
) -> bytes:
    """A standby's `TaskSync` reply: its unfinished tasks, then its recent results."""
    records: list[list[object]] = [
        [
            task.task_id,
            task_to_json(task),
            None
            if c is None
            else [list(c.tokens), base64.b64encode(c.rng_state).decode(), c.epoch, c.attempt],
        ]
        for task, c in unfinished
    ]
    records += [
        [
            done.task.task_id,
            task_to_json(done.task),
            None,
            [
                done.state.status.value,
                done.state.reason,
                done.state.error_type,
                result_to_json(done.result) if done.result is not None else None,
            ],
        ]
        for done in finished
    ]
    return json.dumps(records).encode()


def take_all(store: TaskStore, peer: NodeId, payload: bytes) -> list[InferenceTask | None]:
    """A standby's `TaskSync` reply into `store` (`TaskReplicas._pull_from`); one bad
    record costs that task only. A store that fails (`sqlite3.Error`: the disk full)
    fails the whole take, raised: the standby is asked again later, where skipping on
    would have called its tasks taken."""
    records = json.loads(payload)
    if not isinstance(records, list):
        raise ValueError(f"a list of tasks expected, got {type(records).__name__}")
    taken: list[InferenceTask | None] = []
    for record in records:
        try:
            changed, task = take(store, record)
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            log.warning("a task of node %s not taken: %s", peer, e)
            continue
        if changed:
            taken.append(task)
    return taken


def take(store: TaskStore, record: list[Any]) -> tuple[bool, InferenceTask | None]:
    """One record of a standby's `TaskSync` reply into `store`: whether the task was new
    here or is now finished here, and the task if it is new here and unfinished. A record
    is the task's id, its JSON, its checkpoint (or None) and, for a finished task, its
    end: status, reason, error type and result JSON (or None). A task this node already
    holds finished stays as it is. Every field is checked before SQLite sees it
    (`ValueError`): a list where the id or the epoch goes failed to bind,
    `sqlite3.ProgrammingError`, which ended the gateway taking over (a review)."""
    task_id, text, checkpoint, end = _fields(record)
    held = store.get(task_id)
    if held is not None and held.state.terminal:
        return False, None
    new = None
    if held is None:
        new = task_from_json(task_id, text)
        store.copy(new)
    if end is not None:
        status, reason, error_type, result = end
        state = TaskState(TaskStatus(status), reason, error_type)
        if not state.terminal:
            raise ValueError(f"task {task_id} sent as finished in state {status!r}")
        store.finish(
            RequestId(task_id), state, result_from_json(task_id, result) if result else None
        )
        return True, None
    if checkpoint is not None:
        store.save_checkpoint(RequestId(task_id), checkpoint)
    if new is not None and (copied := store.get(task_id)) is not None and copied.state.terminal:
        return True, None  # it took an end that came before it (`store.END_ARRIVED`): not run
    return new is not None, new


def _fields(record: object) -> tuple[str, str, Checkpoint | None, list[Any] | None]:
    """A record's id, task JSON, checkpoint and end, each of the type `take` writes;
    `ValueError` naming the first that is not."""
    if not isinstance(record, list) or not 3 <= len(record) <= 4:
        raise ValueError(f"a record is a list of 3 or 4 items, got {_shown(record)}")
    task_id, text, raw, *rest = record
    _check(task_id, str, "task id")
    _check(text, str, f"task {task_id}'s record")
    end = rest[0] if rest else None
    if end is not None:
        if not isinstance(end, list) or len(end) != 4:
            raise ValueError(f"task {task_id}'s end is not a list of 4 items: {_shown(end)}")
        for item, what in zip(end[:3], ("status", "reason", "error type"), strict=True):
            _check(item, str, f"task {task_id}'s {what}")
        _check(end[3], str | None, f"task {task_id}'s result")
    return task_id, text, None if raw is None else _checkpoint(task_id, raw), end


def _checkpoint(task_id: str, raw: object) -> Checkpoint:
    """A record's checkpoint: tokens, RNG state in base64, epoch and (from a node that
    has them) attempt."""
    if not isinstance(raw, list) or not 3 <= len(raw) <= 4:
        raise ValueError(f"task {task_id}'s checkpoint is not a list of 3 or 4: {_shown(raw)}")
    tokens, rng, epoch, *attempt = raw  # no attempt: a node from before them
    _check(tokens, list, f"task {task_id}'s checkpoint tokens")
    for token in tokens:
        _check(token, int, f"a token of task {task_id}'s checkpoint")
    _check(rng, str, f"task {task_id}'s RNG state")
    _check(epoch, int, f"task {task_id}'s checkpoint epoch")
    run = attempt[0] if attempt else 0
    _check(run, int, f"task {task_id}'s checkpoint attempt")
    return Checkpoint(tuple(tokens), base64.b64decode(rng, validate=True), epoch, run)


def _check(value: object, kind: Any, what: str) -> None:
    """`ValueError` unless `value` is a `kind` (a bool is no int here), and an int one
    SQLite stores (64 bits: a larger one raised OverflowError as it was bound)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{what} is of the wrong type: {_shown(value)}")
    if isinstance(value, int) and not 0 <= value < INT_SPAN:
        raise ValueError(f"{what} is out of range: {_shown(value)}")


def _shown(value: object) -> str:
    return repr(value)[:80]


__all__ = ["sync_payload", "take", "take_all"]
