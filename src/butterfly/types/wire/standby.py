"""What the acting gateway sends the other gateway-capable nodes, so its death loses
nothing (`wiring.standby`): every accepted task before its 202, each running task's
generation checkpoint every `coordination.checkpoint_frequency` tokens, and each task's
end. Only the acting gateway may send them (`protocol.entitled`).

    kind              sent by          answered by / effect
    task_copy         acting gateway   task_copied, once the task is in the standby's store
    task_checkpoint   acting gateway   the standby keeps the checkpoint (one-way)
    task_settled      acting gateway   the standby records the end and the result; one-way,
                                       but a cancel's is asked: task_copied once recorded
    task_sync         acting gateway   task_sync_reply: the standby's unfinished tasks, so
                                       a gateway that starts acting runs those only a
                                       standby held (one that acted while it was down),
                                       and its recent results, so theirs stay readable

The task and the result travel as the task store's own JSON records in the payload
(`schedule.store.task_to_json`, `result_to_json`): the standby writes what the acting
gateway would have written, and the one format is checked where it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.base import Ask, Text


@dataclass(frozen=True, slots=True)
class TaskCopied:
    kind: ClassVar[str] = "task_copied"
    node: NodeId
    task_id: Text
    ok: bool
    error: Text = ""


@dataclass(frozen=True, slots=True)
class TaskCopy(Ask[TaskCopied]):
    """An accepted task; the payload is its JSON record."""

    kind: ClassVar[str] = "task_copy"
    task_id: Text


@dataclass(frozen=True, slots=True)
class TaskCheckpoint:
    """A running task's generation so far: the tokens sampled, the plan epoch they were
    sampled in, the run they belong to (`attempt`: an audit that withdrew a run's tokens
    starts the next with an empty checkpoint of the next attempt, which no checkpoint of
    an earlier one replaces); the payload is the sampling RNG's state after the last of
    them."""

    kind: ClassVar[str] = "task_checkpoint"
    task_id: Text
    tokens: tuple[int, ...]
    epoch: Epoch
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class TaskSettled(Ask[TaskCopied]):
    """A task's terminal state; the payload is the result's JSON record (empty if none).
    Sent one-way, but for a cancel's end, which the client is told only once a standby
    holds it (`wiring.standby.TaskReplicas.cancelled`)."""

    kind: ClassVar[str] = "task_settled"
    task_id: Text
    status: Text
    reason: Text
    error_type: Text


@dataclass(frozen=True, slots=True)
class TaskSyncReply:
    """`count` unfinished tasks; the payload is a JSON list of records, each the task's
    id, its store record, and its checkpoint if any (tokens, RNG state in base64, epoch, attempt);
    then the standby's recent finished tasks, each with a fourth item, its end (status,
    reason, error type, result record or null). `error`: the standby could not read its
    store (the disk failed) and hands over nothing; asked again when it is resynced. Left
    out while empty (`OMIT_EMPTY`), so a node from before it reads the reply as it was."""

    kind: ClassVar[str] = "task_sync_reply"
    OMIT_EMPTY: ClassVar[tuple[str, ...]] = ("error",)
    node: NodeId
    count: int
    error: Text = ""


@dataclass(frozen=True, slots=True)
class TaskSync(Ask[TaskSyncReply]):
    kind: ClassVar[str] = "task_sync"


StandbyMessage = TaskCopy | TaskCopied | TaskCheckpoint | TaskSettled | TaskSync | TaskSyncReply

__all__ = [
    "StandbyMessage",
    "TaskCheckpoint",
    "TaskCopied",
    "TaskCopy",
    "TaskSettled",
    "TaskSync",
    "TaskSyncReply",
]
