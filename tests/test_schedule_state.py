"""The task state machine: the seed's path, failure, cancellation, and every refusal."""

from __future__ import annotations

import itertools

import pytest

from butterfly.schedule.state import (
    DISPATCH,
    FINISH,
    RUNNING,
    SUBMITTED,
    TERMINAL,
    Fail,
    Step,
    TaskEvent,
    TaskState,
    TaskStatus,
    apply,
    transition,
)
from butterfly.types.errors import InvalidTransition

HAPPY = [
    (Step.ENQUEUE, TaskStatus.QUEUED),
    (Step.START_PARTITIONING, TaskStatus.PARTITIONING),
    (Step.PARTITION_COMPLETE, TaskStatus.COORDINATING),
    (Step.COORDINATION_COMPLETE, TaskStatus.COMPUTING),
    (Step.COMPUTATION_COMPLETE, TaskStatus.AGGREGATING),
    (Step.AGGREGATION_COMPLETE, TaskStatus.COMMITTING),
    (Step.COMMIT_COMPLETE, TaskStatus.COMPLETED),
]
LIVE = [s for s in TaskStatus if s not in TERMINAL]
EVENTS: list[TaskEvent] = [*Step, Fail("boom")]


def test_happy_path_follows_the_seed() -> None:
    state = SUBMITTED
    for event, expected in HAPPY:
        state = transition(state, event)
        assert state.status is expected
    assert state.terminal


def test_dispatch_and_finish_groups_are_the_path_in_between() -> None:
    queued = apply(SUBMITTED, Step.ENQUEUE)
    assert apply(queued, *DISPATCH).status is TaskStatus.COMPUTING
    assert apply(apply(queued, *DISPATCH), *FINISH).status is TaskStatus.COMMITTING


@pytest.mark.parametrize("status", LIVE)
def test_fail_and_cancel_from_every_live_state(status: TaskStatus) -> None:
    failed = transition(TaskState(status), Fail("node 2 lied", "byzantine_violation"))
    assert failed == TaskState(TaskStatus.FAILED, "node 2 lied", "byzantine_violation")
    assert transition(TaskState(status), Step.CANCEL).status is TaskStatus.CANCELLED


@pytest.mark.parametrize(
    ("status", "event"), list(itertools.product([s for s in TaskStatus if s in TERMINAL], EVENTS))
)
def test_terminal_states_accept_nothing(status: TaskStatus, event: TaskEvent) -> None:
    with pytest.raises(InvalidTransition, match="already finished"):
        transition(TaskState(status), event)


def test_skipping_a_step_is_refused_with_both_names() -> None:
    with pytest.raises(InvalidTransition, match=r"submitted.*start_partitioning"):
        transition(SUBMITTED, Step.START_PARTITIONING)
    queued = transition(SUBMITTED, Step.ENQUEUE)
    with pytest.raises(InvalidTransition):
        transition(queued, Step.COMMIT_COMPLETE)
    with pytest.raises(InvalidTransition):
        transition(queued, Step.ENQUEUE)


def test_every_forward_step_is_allowed_from_exactly_one_state() -> None:
    forward = [e for e, _ in HAPPY]
    for event in forward:
        allowed = []
        for status in LIVE:
            try:
                transition(TaskState(status), event)
            except InvalidTransition:
                continue
            allowed.append(status)
        assert len(allowed) == 1, (event, allowed)


def test_requeue_only_from_running_states() -> None:
    for status in LIVE:
        if status in RUNNING:
            assert transition(TaskState(status), Step.REQUEUE).status is TaskStatus.QUEUED
        else:
            with pytest.raises(InvalidTransition):
                transition(TaskState(status), Step.REQUEUE)


def test_apply_is_pure() -> None:
    queued = apply(SUBMITTED, Step.ENQUEUE)
    with pytest.raises(InvalidTransition):
        apply(queued, Step.START_PARTITIONING, Step.COMMIT_COMPLETE)
    assert queued.status is TaskStatus.QUEUED  # the input value is untouched
