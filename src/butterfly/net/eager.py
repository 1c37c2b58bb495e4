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
from collections.abc import Coroutine, Generator
from typing import Any


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """A task running `coro`, already run up to where it first waits (or to its end)."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    started = _Started(coro)
    task = loop.create_task(started, context=context)
    caller = asyncio.current_task(loop)
    if caller is not None:
        _leave_task(loop, caller)
    _enter_task(loop, task)
    try:
        started.waiting_on = context.run(coro.send, None)
    except StopIteration:
        started.finished = True
    except BaseException as e:  # the task raises it at its first turn, as if it ran it
        started.error = e
    finally:
        _leave_task(loop, task)
        if caller is not None:
            _enter_task(loop, caller)
    return task


class _Started(Coroutine[Any, Any, None]):
    """A coroutine already run to its first wait, as its task sees it: the first `send`
    hands over what it waits on (or how it ended), and everything after goes to it."""

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self._coro, self._first = coro, True
        self.finished = False
        self.error: BaseException | None = None
        self.waiting_on: Any = None

    def send(self, value: Any) -> Any:
        if self._first:
            self._first = False
            if self.error is not None:
                raise self.error
            if self.finished:
                raise StopIteration
            return self.waiting_on
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        exc = typ if isinstance(typ, BaseException) else typ() if val is None else val
        if self._first:  # the task is cancelled before its first turn
            self._first = False
            if self.error is not None or self.finished:
                raise exc  # it is over already: the task ends as told
            if isinstance(self.waiting_on, asyncio.Future):
                self.waiting_on.cancel()  # as a task cancels what it waits on
        return self._coro.throw(exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("a started handler is driven by its own task only")


__all__ = ["start_eagerly"]
