"""The task state machine of seed 004, as a pure function.

    Submitted -Enqueue-> Queued -StartPartitioning-> Partitioning -PartitionComplete->
    Coordinating -CoordinationComplete-> Computing -ComputationComplete-> Aggregating
    -AggregationComplete-> Committing -CommitComplete-> Completed

    any live state -Fail(reason)-> Failed(reason)
    any live state -Cancel->       Cancelled
    a running state -Requeue->     Queued        (recovery after a gateway restart)

Everything else is refused with `InvalidTransition`, and terminal states accept nothing.

Three deliberate differences from the seed:
- The seed allows `Fail` from *any* state, including Completed; a finished task failing
  later would turn a result a client already read into an error, so terminal states
  refuse it.
- The seed allows `Cancel` only up to Partitioning, because its work assignment could not
  be revoked. Here an engine frees a cancelled task's state on every node, so a running
  task can be cancelled, and must be: a client that gave up should not hold a slot.
- `Requeue` is new: a task the gateway was running when it stopped is re-run from the
  start when it comes back, so no accepted task is lost.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from butterfly.types.errors import InvalidTransition


class TaskStatus(enum.StrEnum):
    SUBMITTED = "submitted"
    QUEUED = "queued"
    PARTITIONING = "partitioning"
    COORDINATING = "coordinating"
    COMPUTING = "computing"
    AGGREGATING = "aggregating"
    COMMITTING = "committing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def running(self) -> bool:
        """Dispatched to an engine and not yet finished."""
        return self in RUNNING


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
RUNNING = frozenset(
    {
        TaskStatus.PARTITIONING,
        TaskStatus.COORDINATING,
        TaskStatus.COMPUTING,
        TaskStatus.AGGREGATING,
        TaskStatus.COMMITTING,
    }
)


@dataclass(frozen=True)
class TaskState:
    """A status, and for Failed why: a message and the error's `kind` (its HTTP `type`)."""

    status: TaskStatus
    reason: str = ""
    error_type: str = ""

    @property
    def terminal(self) -> bool:
        return self.status.terminal


class Step(enum.Enum):
    """The events without data; `Fail` carries its reason."""

    ENQUEUE = "enqueue"
    START_PARTITIONING = "start_partitioning"
    PARTITION_COMPLETE = "partition_complete"
    COORDINATION_COMPLETE = "coordination_complete"
    COMPUTATION_COMPLETE = "computation_complete"
    AGGREGATION_COMPLETE = "aggregation_complete"
    COMMIT_COMPLETE = "commit_complete"
    CANCEL = "cancel"
    REQUEUE = "requeue"


@dataclass(frozen=True)
class Fail:
    reason: str
    error_type: str = "internal_error"


TaskEvent = Step | Fail

SUBMITTED = TaskState(TaskStatus.SUBMITTED)

_FORWARD: dict[tuple[TaskStatus, Step], TaskStatus] = {
    (TaskStatus.SUBMITTED, Step.ENQUEUE): TaskStatus.QUEUED,
    (TaskStatus.QUEUED, Step.START_PARTITIONING): TaskStatus.PARTITIONING,
    (TaskStatus.PARTITIONING, Step.PARTITION_COMPLETE): TaskStatus.COORDINATING,
    (TaskStatus.COORDINATING, Step.COORDINATION_COMPLETE): TaskStatus.COMPUTING,
    (TaskStatus.COMPUTING, Step.COMPUTATION_COMPLETE): TaskStatus.AGGREGATING,
    (TaskStatus.AGGREGATING, Step.AGGREGATION_COMPLETE): TaskStatus.COMMITTING,
    (TaskStatus.COMMITTING, Step.COMMIT_COMPLETE): TaskStatus.COMPLETED,
}

DISPATCH = (Step.START_PARTITIONING, Step.PARTITION_COMPLETE, Step.COORDINATION_COMPLETE)
"""Queued -> Computing: the steps a scheduler takes when it hands a task to an engine."""

FINISH = (Step.COMPUTATION_COMPLETE, Step.AGGREGATION_COMPLETE)
"""Computing -> Committing: the engine returned and the result is being assembled."""


def transition(state: TaskState, event: TaskEvent) -> TaskState:
    """The state after `event`, or `InvalidTransition` naming both when it is not allowed."""
    status = state.status
    if not status.terminal:
        match event:
            case Fail(reason=reason, error_type=error_type):
                return TaskState(TaskStatus.FAILED, reason, error_type)
            case Step.CANCEL:
                return TaskState(TaskStatus.CANCELLED)
            case Step.REQUEUE if status.running:
                return TaskState(TaskStatus.QUEUED)
            case Step():
                nxt = _FORWARD.get((status, event))
                if nxt is not None:
                    return TaskState(nxt)
    name = event.value if isinstance(event, Step) else "fail"
    raise InvalidTransition(
        f"a task that is {status.value} cannot take the event {name!r}"
        + (" (it has already finished)" if status.terminal else "")
    )


def apply(state: TaskState, *events: TaskEvent) -> TaskState:
    """Several transitions in order; the first refused one raises and nothing is applied."""
    for event in events:
        state = transition(state, event)
    return state


__all__ = [
    "DISPATCH",
    "FINISH",
    "SUBMITTED",
    "Fail",
    "Step",
    "TaskEvent",
    "TaskState",
    "TaskStatus",
    "apply",
    "transition",
]
