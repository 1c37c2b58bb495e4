"""Start a task's coroutine at once, on the caller's turn of the event loop.

A connection's reader hands each frame to a handler task. Started by `create_task`, the
handler begins on a later turn of the loop: the reader first goes back to its socket,
then the loop gets to the task. A stage step on a middle node usually never waits (its
compiled call runs inline and its output is written at once), so all that turn bought
was delay on the path every token takes. Python 3.12 has this as `eager_start`; this is
the same for 3.11.

The task exists before its coroutine runs, and the part run at once runs as that task:
`asyncio.current_task()` is the task, not the caller, so what a handler enters before it
first waits (`asyncio.timeout` captures the current task, to cancel it when time is up)
belongs to the task; and it runs in the task's context, so a context variable the
handler sets (`metrics.logcontext.REQUEST_ID`) never leaks into the caller. The task's
own first turn then only finds its coroutine finished, off the step's path, or carries
on where it waits.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from asyncio.tasks import _enter_task, _leave_task
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class _Start:
    """How the part run at once ended: finished, raised `error`, or waits on `waiting_on`."""

    finished: bool = False
    error: BaseException | None = None
    waiting_on: Any = None


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """A task running `coro`, already run up to where it first waits (or to its end)."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    start = _Start()
    task = loop.create_task(_resume(coro, start), context=context)
    caller = asyncio.current_task(loop)
    if caller is not None:
        _leave_task(loop, caller)
    _enter_task(loop, task)
    try:
        start.waiting_on = context.run(coro.send, None)
    except StopIteration:
        start.finished = True
    except BaseException as e:  # the task raises it, as if it had run it itself
        start.error = e
    finally:
        _leave_task(loop, task)
        if caller is not None:
            _enter_task(loop, caller)
    task.add_done_callback(lambda _: _abandon(coro, start))
    return task


def _abandon(coro: Coroutine[Any, Any, None], start: _Start) -> None:
    """Once the task is done: a coroutine it never drove (the task was cancelled before
    its first turn) unwinds here, and what it waited on is cancelled, as a cancelled
    task's would be. A no-op for a coroutine that ran to its end."""
    coro.close()
    if isinstance(start.waiting_on, asyncio.Future):
        start.waiting_on.cancel()


async def _resume(coro: Coroutine[Any, Any, None], start: _Start) -> None:
    if start.error is not None:
        raise start.error
    if not start.finished:
        await _drive(coro, start.waiting_on)


@types.coroutine
def _drive(coro: Coroutine[Any, Any, None], waiting_on: Any) -> Generator[Any, Any, None]:
    """Yield what `coro` waits on to the task, and feed it what the task sends back
    (a future's wake-up) or throws in (a cancellation): the task drives `coro` exactly
    as if it had started it."""
    try:
        while True:
            try:
                sent = yield waiting_on
            except BaseException as e:  # CancelledError, or the task's coroutine closed
                waiting_on = coro.throw(e)
            else:
                waiting_on = coro.send(sent)
    except StopIteration:
        return


__all__ = ["start_eagerly"]
