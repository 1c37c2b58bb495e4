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
    record costs that task only."""
    records = json.loads(payload)
    if not isinstance(records, list):
        raise ValueError(f"a list of tasks expected, got {type(records).__name__}")
    taken: list[InferenceTask | None] = []
    for record in records:
        try:
            changed, task = take(store, record)
        except (ValueError, KeyError, TypeError) as e:
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
    holds finished stays as it is."""
    task_id, text, checkpoint, *rest = record
    held = store.get(task_id)
    if held is not None and held.state.terminal:
        return False, None
    new = None
    if held is None:
        new = task_from_json(task_id, text)
        store.copy(new)
    if rest and rest[0] is not None:
        status, reason, error_type, result = rest[0]
        state = TaskState(TaskStatus(status), reason, error_type)
        if not state.terminal:
            raise ValueError(f"task {task_id} sent as finished in state {status!r}")
        store.finish(
            RequestId(task_id), state, result_from_json(task_id, result) if result else None
        )
        return True, None
    if checkpoint is not None:
        tokens, rng, epoch, *attempt = checkpoint  # no attempt: a node from before them
        run = int(attempt[0]) if attempt else 0
        saved = Checkpoint(tuple(tokens), base64.b64decode(rng), epoch, run)
        store.save_checkpoint(RequestId(task_id), saved)
    return new is not None, new


__all__ = ["sync_payload", "take", "take_all"]
