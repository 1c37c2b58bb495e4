"""Start a task's coroutine at once, on the caller's turn of the event loop.

A connection's reader hands each frame to a handler task. Started by `create_task`, the
handler begins on a later turn of the loop: the reader first goes back to its socket,
then the loop gets to the task. A stage step on a middle node usually never waits (its
compiled call runs inline and its output is written at once), so all that turn bought
was delay on the path every token takes. Python 3.12 has this as `eager_start`; this is
the same for 3.11.

The task exists before its coroutine runs, and the part run at once runs as that task:
`asyncio.current_task()` is the task, not the caller, so what a handler enters before it
first waits belongs to the task (`asyncio.timeout` captures the current task, to cancel
it when time is up: as the reader's, a handler's timeout cancelled the connection's
reader); and it runs in the task's context, so a context variable the handler sets
(`metrics.logcontext.REQUEST_ID`) is set and reset there, never in the caller's. The
task is then given the coroutine as it stands (`_Started`), and drives it from there as
it drives any: a cancellation, even before the task's first turn (a connection closed
in the same turn), reaches the handler where it waits.
"""

from __future__ import annotations

import asyncio
import contextvars
from asyncio.tasks import _enter_task, _leave_task
from collections.abc import Callable, Coroutine, Generator
from types import CodeType, FrameType
from typing import Any, TypeVar

T = TypeVar("T")


def start_eagerly(
    coro: Coroutine[Any, Any, T], *, track: Callable[[asyncio.Task[T]], None] | None = None
) -> asyncio.Task[T]:
    """A task running `coro`, already run up to where it first waits (or to its end).
    `track` gets the task before `coro` runs, so what the part run at once does to
    the tasks it tracks (a connection's close cancels its handlers) reaches this one."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    started = _Started(coro)
    task = loop.create_task(started, context=context)
    if track is not None:
        track(task)
    caller = asyncio.current_task(loop)
    if caller is not None:
        _leave_task(loop, caller)
    _enter_task(loop, task)
    try:
        started.waiting_on = context.run(coro.send, None)
    except StopIteration as e:
        started.finished, started.value = True, e.value
    except BaseException as e:  # the task raises it at its first turn, as if it ran it
        tb = e.__traceback__  # without this frame, which holds the task and the caller
        started.error = e.with_traceback(tb.tb_next if tb is not None else None)
    finally:
        _leave_task(loop, task)
        if caller is not None:
            _enter_task(loop, caller)
    return task


class _Started(Coroutine[Any, Any, T]):
    """A coroutine already run to its first wait, as its task sees it: the first `send`
    hands over what it waits on (or how it ended), and everything after goes to it.
    It shows as the coroutine it wraps (name, frame), so a stuck handler's task prints
    its stack (`wiring.process.overdue_tasks`)."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro, self._first = coro, True
        self.__name__ = getattr(coro, "__name__", type(coro).__name__)
        self.__qualname__ = getattr(coro, "__qualname__", self.__name__)
        self.finished, self.value = False, None
        self.error: BaseException | None = None
        self.waiting_on: Any = None

    def _handed_over(self) -> tuple[BaseException | None, Any]:
        """How the part run at once ended, once; what it held is let go of."""
        self._first = False
        error, waiting_on = self.error, self.waiting_on
        self.error, self.waiting_on = None, None
        return error, waiting_on

    def send(self, value: Any) -> Any:
        if self._first:
            error, waiting_on = self._handed_over()
            if error is not None:
                raise error
            if self.finished:
                raise StopIteration(self.value)
            return waiting_on
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        exc = typ if isinstance(typ, BaseException) else typ() if val is None else val
        if self._first:  # the task is cancelled before its first turn
            error, waiting_on = self._handed_over()
            if error is not None:  # it ran and failed: its error outranks a late cancel
                raise error
            if self.finished:
                raise exc  # as a task cancelled just before its coroutine returned
            if isinstance(waiting_on, asyncio.Future):
                waiting_on.cancel()  # as a task cancels what it waits on
        return self._coro.throw(exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        raise TypeError("a started handler is driven by its own task only")

    # what asyncio reads of a coroutine for a task's repr and stack
    @property
    def cr_frame(self) -> FrameType | None:
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_code(self) -> CodeType | None:
        return getattr(self._coro, "cr_code", None)

    @property
    def cr_running(self) -> bool:
        return bool(getattr(self._coro, "cr_running", False))

    @property
    def cr_await(self) -> Any:
        return getattr(self._coro, "cr_await", None)


__all__ = ["start_eagerly"]
