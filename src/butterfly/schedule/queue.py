"""The bounded queue of tasks waiting for an execution slot.

Bounded because an unbounded queue turns overload into unbounded latency and memory: past
`capacity`, `push` refuses with `QueueFull` (the API answers 429 with Retry-After) and
the client decides whether to wait. Tasks recovered after a restart were already
accepted, so they are pushed with `force=True` and may exceed the bound.

Two policies:
- FIFO: acceptance order.
- PRIORITY: higher `priority` first, acceptance order among equals (so equal-priority
  tasks never starve each other).

Both keep one heap keyed by (policy key, arrival number); removal (cancel) is lazy, so
push, pop and remove are all O(log n).
"""

from __future__ import annotations

import enum
import heapq
import itertools

from butterfly.types.errors import QueueFull
from butterfly.types.tasks import InferenceTask


class QueuePolicy(enum.StrEnum):
    FIFO = "fifo"
    PRIORITY = "priority"


class TaskQueue:
    def __init__(self, capacity: int, policy: QueuePolicy = QueuePolicy.FIFO) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        self._heap: list[tuple[int, int, str]] = []
        # The live entries by id, with their arrival number: the heap may still hold
        # entries of removed tasks, and a stale entry must not pop a re-queued task early.
        self._tasks: dict[str, tuple[int, InferenceTask]] = {}
        self._arrival = itertools.count()

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def push(self, task: InferenceTask, *, force: bool = False) -> None:
        """Queue `task`; `QueueFull` when at capacity unless `force`."""
        if not force and len(self._tasks) >= self.capacity:
            raise QueueFull(
                f"the task queue is full ({self.capacity} tasks waiting); retry later or "
                "raise the scheduler's queue capacity"
            )
        if task.task_id in self._tasks:
            raise ValueError(f"task {task.task_id} is already queued")
        arrival = next(self._arrival)
        self._tasks[task.task_id] = (arrival, task)
        heapq.heappush(self._heap, (self._key(task), arrival, task.task_id))

    def retune(self, capacity: int, policy: QueuePolicy) -> None:
        """A changed scheduling.max_queue or scheduling.policy, at once: waiting tasks are
        re-ordered by the new policy (acceptance order kept among equals). A smaller
        capacity refuses new tasks until the queue drains below it; none is dropped."""
        if capacity < 1:
            raise ValueError(f"queue capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        if policy is self.policy:
            return
        self.policy = policy
        self._heap = [(self._key(t), a, t.task_id) for a, t in self._tasks.values()]
        heapq.heapify(self._heap)

    def _key(self, task: InferenceTask) -> int:
        return -task.priority if self.policy is QueuePolicy.PRIORITY else 0

    def pop(self) -> InferenceTask | None:
        """The next task by policy, or None when empty."""
        while self._heap:
            _, arrival, task_id = heapq.heappop(self._heap)
            entry = self._tasks.get(task_id)
            if entry is not None and entry[0] == arrival:
                del self._tasks[task_id]
                return entry[1]
        return None

    def remove(self, task_id: str) -> InferenceTask | None:
        """Take a task out (it was cancelled); None when it is not queued."""
        entry = self._tasks.pop(task_id, None)
        if len(self._heap) > 2 * len(self._tasks) + 16:  # drop stale entries now and then
            self._heap = [e for e in self._heap if self._live(e)]
            heapq.heapify(self._heap)
        return entry[1] if entry is not None else None

    def _live(self, entry: tuple[int, int, str]) -> bool:
        found = self._tasks.get(entry[2])
        return found is not None and found[0] == entry[1]

    def position(self, task_id: str) -> int | None:
        """How many tasks run before this one (0 = next); None when not queued. O(n)."""
        if task_id not in self._tasks:
            return None
        live = sorted(e for e in self._heap if self._live(e))
        return next(i for i, e in enumerate(live) if e[2] == task_id)


__all__ = ["QueuePolicy", "TaskQueue"]
