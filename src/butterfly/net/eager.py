"""Start a coroutine at once, on the caller's turn of the event loop, and make a task of
it only if it has to wait.

A connection's reader hands each frame to a handler. As a task (`asyncio.create_task`)
the handler starts on a later turn of the loop: the reader first goes back to the
socket, the loop polls, and only then does the step that came in begin. A stage step on
a middle node usually never waits at all (its compiled call runs inline and its output
is written at once), so all that task bought was the delay. Python 3.12 has this as
`asyncio.eager_task_factory`; this is the same for 3.11, per call instead of per loop.

The part that runs at once runs in a copy of the caller's context, and the task that
takes over runs in that same copy, so a context variable the handler sets and resets
(`metrics.logcontext.REQUEST_ID`) never leaks into the reader and is reset where it was
set. Cancelling the task cancels what the coroutine waits on, as for any task.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Coroutine, Generator
from typing import Any


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coro` until it first waits; None if it finished, else the task that now
    owns it (the caller keeps a reference, as with `create_task`)."""
    context = contextvars.copy_context()
    try:
        waiting_on = context.run(coro.send, None)
    except StopIteration:
        return None
    loop = asyncio.get_running_loop()
    return loop.create_task(_resume(coro, waiting_on), context=context)


async def _resume(coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    await _drive(coro, waiting_on)


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
    finally:
        coro.close()  # a no-op once finished; else what a closed task's would do


__all__ = ["start_eagerly"]
