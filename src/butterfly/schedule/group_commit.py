"""Store writes made during one turn of the event loop, committed together.

Concurrent requests arrive, and finish, in bursts (one step result finishes every
request of a batch; a standby receives the acting gateway's copies as fast as clients
send tasks), and one commit per burst replaces one per write. Each caller still awaits
its own write's commit, so "committed before answered" holds; waiting adds no latency,
as the flush runs (`call_soon`) before the loop next polls for I/O. Used by the acting
gateway's scheduler and by a standby gateway's copies (`wiring.standby`).

A terminal state the store refused (the disk full) is `keep`-ed: it is written again
with every later commit, in a transaction of its own (a row that cannot be written must
not refuse the others), until it is stored; meanwhile `unwritten` answers for it, so a
reader never sees the task unfinished again (the store still says queued).
"""

from __future__ import annotations

import asyncio
import contextlib

from butterfly.schedule.state import TaskState
from butterfly.schedule.store import TaskStore
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceResult, InferenceTask


class GroupCommit:
    """Adds (`TaskStore.write`'s inserts: a taken id is refused with `TaskAlreadyExists`)
    and terminal states of one loop turn, in one transaction, adds first."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self._adds: list[tuple[InferenceTask, asyncio.Future[None]]] = []
        self._finishes: list[
            tuple[tuple[RequestId, TaskState, InferenceResult | None], asyncio.Future[None]]
        ] = []
        self._scheduled = False
        self._unwritten: dict[RequestId, tuple[TaskState, InferenceResult | None]] = {}

    def add(self, task: InferenceTask) -> asyncio.Future[None]:
        fut = self._schedule()
        self._adds.append((task, fut))
        return fut

    def finish(
        self, task_id: RequestId, state: TaskState, result: InferenceResult | None
    ) -> asyncio.Future[None]:
        fut = self._schedule()
        self._finishes.append(((task_id, state, result), fut))
        return fut

    def keep(self, task_id: RequestId, state: TaskState, result: InferenceResult | None) -> None:
        """Write this terminal state with every later commit until one stores it."""
        self._unwritten[task_id] = (state, result)

    def unwritten(self, task_id: str) -> TaskState | None:
        """The terminal state kept for `task_id` that the store has not taken yet."""
        kept = self._unwritten.get(RequestId(task_id))
        return kept[0] if kept is not None else None

    def _schedule(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return loop.create_future()

    def _flush(self) -> None:
        adds, self._adds = self._adds, []
        finishes, self._finishes = self._finishes, []
        self._scheduled = False
        futures = [f for _, f in adds] + [f for _, f in finishes]
        try:
            refused = self._store.write([t for t, _ in adds], [w for w, _ in finishes])
        except Exception as e:
            for fut in futures:
                if not fut.done():  # a caller cancelled meanwhile; the write still stands
                    fut.set_exception(e)
            return
        finally:
            self._write_kept()
        outcomes: list[BaseException | None] = [*refused, *([None] * len(finishes))]
        for fut, error in zip(futures, outcomes, strict=True):
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    def _write_kept(self) -> None:
        """Try the kept terminal states again: once the store takes them, they are its."""
        if not self._unwritten:
            return
        kept = list(self._unwritten.items())
        with contextlib.suppress(Exception):  # still refused: the next commit tries again
            self._store.write((), [(task_id, state, result) for task_id, (state, result) in kept])
            for task_id, _ in kept:
                del self._unwritten[task_id]


__all__ = ["GroupCommit"]
