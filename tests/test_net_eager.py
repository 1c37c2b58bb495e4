"""A handler started at once (net.eager): it runs on the caller's turn until it first
waits, as its own task (the current task, with its own context), and that task then
drives it exactly as one started by `create_task` would: values and exceptions in,
cancellation through, a timeout entered before the wait cancelling the handler only."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable

import pytest

from butterfly.metrics.events import discard
from butterfly.net.conn import Connection, Reply
from butterfly.net.eager import start_eagerly
from butterfly.net.framing import Envelope, encode_frame
from butterfly.types.errors import SendTimeout
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.wire.data import Release

WHO = contextvars.ContextVar("who", default="reader")
Handler = Callable[[NodeId, Envelope], Awaitable[Reply | None]]


async def test_a_coroutine_that_never_waits_ran_before_it_returns() -> None:
    seen: list[str] = []

    async def handler() -> None:
        seen.append("ran")

    task = start_eagerly(handler())
    assert seen == ["ran"]  # no turn of the loop in between
    await asyncio.wait_for(task, 5)


async def test_the_part_run_at_once_runs_as_the_returned_task() -> None:
    current: list[asyncio.Task[object] | None] = []

    async def handler() -> None:
        current.append(asyncio.current_task())

    caller = asyncio.current_task()
    task = start_eagerly(handler())
    assert current == [task]
    assert asyncio.current_task() is caller  # the caller is current again
    await asyncio.wait_for(task, 5)


async def test_a_timeout_entered_before_the_wait_cancels_the_handler_not_the_caller() -> None:
    """`asyncio.timeout` captures the current task to cancel it: run as the caller,
    the handler's timeout would cancel the connection's reader instead."""
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outcome: list[str] = []

    async def handler() -> None:
        try:
            async with asyncio.timeout(0.01):
                await never
        except TimeoutError:
            outcome.append("timed out")

    task = start_eagerly(handler())
    await asyncio.sleep(0.05)  # the caller is not cancelled meanwhile
    await asyncio.wait_for(task, 5)
    assert outcome == ["timed out"]


async def test_the_part_before_a_wait_runs_at_once_and_the_task_finishes_the_rest() -> None:
    seen: list[object] = []
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        seen.append("before")
        seen.append(await answer)
        await asyncio.sleep(0)  # a bare yield to the loop, as asyncio.sleep(0) makes
        seen.append("after")

    task = start_eagerly(handler())
    assert seen == ["before"] and not task.done()
    answer.set_result(7)
    await asyncio.wait_for(task, 5)
    assert seen == ["before", 7, "after"]


async def test_an_exception_after_the_wait_is_the_tasks() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        await gate
        raise ValueError("from the handler")

    task = start_eagerly(handler())
    gate.set_result(None)
    with pytest.raises(ValueError, match="from the handler"):
        await asyncio.wait_for(task, 5)


async def test_an_exception_before_any_wait_is_the_tasks_not_the_callers() -> None:
    async def handler() -> None:
        raise ValueError("at once")

    task = start_eagerly(handler())  # the caller (a connection's reader) reads on
    with pytest.raises(ValueError, match="at once"):
        await asyncio.wait_for(task, 5)


async def test_an_exception_thrown_into_the_wait_reaches_the_handler() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    caught: list[str] = []

    async def handler() -> None:
        try:
            await gate
        except KeyError as e:
            caught.append(str(e))

    task = start_eagerly(handler())
    gate.set_exception(KeyError("lost"))
    await asyncio.wait_for(task, 5)
    assert caught == ["'lost'"]


@pytest.mark.parametrize("first_turn", [True, False], ids=["driving", "before_first_turn"])
async def test_cancelling_the_task_unwinds_the_handler_and_cancels_what_it_waits_on(
    first_turn: bool,
) -> None:
    """Before its first turn, the task has not yet taken the handler over; a connection's
    close cancels its handlers at any moment."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    unwound: list[str] = []

    async def handler() -> None:
        token = WHO.set("handler")  # as StageRoutes.step sets REQUEST_ID
        try:
            await gate
        except asyncio.CancelledError:
            unwound.append("cancelled")
            raise
        finally:
            WHO.reset(token)  # in the context it was set in, or ValueError
            unwound.append("finally")

    task = start_eagerly(handler())
    if first_turn:
        await asyncio.sleep(0)  # the task's first turn: it now drives the handler
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert unwound == ["cancelled", "finally"]  # at once, not when collected
    assert gate.cancelled()


async def test_a_context_variable_set_before_the_wait_stays_in_the_handlers_context() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    inside: list[str] = []

    async def handler() -> None:
        token = WHO.set("handler")
        try:
            await gate
            inside.append(WHO.get())
        finally:
            WHO.reset(token)  # a token of another context would raise ValueError here

    task = start_eagerly(handler())
    assert WHO.get() == "reader"  # the reader's context is untouched
    gate.set_result(None)
    await asyncio.wait_for(task, 5)
    assert inside == ["handler"]
    assert WHO.get() == "reader"


class _Transport:
    def __init__(self, buffered: int) -> None:
        self.buffered, self.aborted = buffered, False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted = True


class _Writer:
    """A socket's write side; `stalled`: the peer takes no data, so `drain` never returns."""

    def __init__(self, *, stalled: bool = False) -> None:
        self.transport = _Transport(10 << 20 if stalled else 0)
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed or self.transport.aborted

    def close(self) -> None:
        self.closed = True

    async def drain(self) -> None:
        if self.transport.buffered:
            await asyncio.get_running_loop().create_future()

    async def wait_closed(self) -> None:
        return None


def _connection(handler: Handler, writer: _Writer, peer: int) -> Connection:
    return Connection(
        asyncio.StreamReader(),
        writer,  # type: ignore[arg-type]
        peer=NodeId(peer),
        node=NodeId(1),
        cluster_id="c",
        epoch=lambda: Epoch(1),
        handler=handler,
        emit=discard,
        max_frame=1 << 20,
        send_timeout_s=0.1,
    )


async def test_a_relay_to_a_stalled_next_node_fails_that_send_not_the_incoming_connection() -> None:
    """A middle node's step handler sends its output on before it ever waits; when the
    next node takes no data, that send times out (`asyncio.timeout` around the drain,
    entered in the part run at once) and that connection is aborted, while the one the
    step came in on, from an innocent node, reads on."""
    outcome: list[str] = []
    downstream = _connection(_nothing, _Writer(stalled=True), peer=2)

    async def relay(peer: NodeId, env: Envelope) -> Reply | None:
        try:
            await downstream.send(Release((RequestId("r"),)))
        except SendTimeout:
            outcome.append("send timed out")
        return None

    upstream = _connection(relay, _Writer(), peer=0)
    reader = asyncio.create_task(upstream.run())
    try:
        await _one_frame(upstream, outcome)
        assert outcome == ["send timed out"]
        assert downstream.closed
        assert not upstream.closed and not reader.done()
    finally:
        reader.cancel()


async def _nothing(peer: NodeId, env: Envelope) -> Reply | None:
    return None


async def _one_frame(conn: Connection, seen: list[str]) -> None:
    """Feed `conn` a frame, then wait (at most 2 s) for its handler to note something."""
    frame = Envelope(Release((RequestId("a"),)), NodeId(0), Epoch(1), "c", 0, False, b"")
    conn._reader.feed_data(encode_frame(frame))
    for _ in range(100):
        if seen:
            return
        await asyncio.sleep(0.02)


async def test_a_handler_that_closes_its_own_connection_first_is_cancelled_with_it() -> None:
    """close() cancels the connection's handlers, the one running its first part too:
    its task is tracked before that part runs."""
    seen: list[str] = []
    box: list[Connection] = []

    async def handler(peer: NodeId, env: Envelope) -> Reply | None:
        box[0].close("closed from inside the handler")
        try:
            await asyncio.sleep(5)
            seen.append("outlived its connection")
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return None

    conn = _connection(handler, _Writer(), peer=0)
    box.append(conn)
    reader = asyncio.create_task(conn.run())
    try:
        await _one_frame(conn, seen)
        assert seen == ["cancelled"]
    finally:
        reader.cancel()


async def test_the_task_shows_the_handler_and_keeps_its_result() -> None:
    """A stuck handler's task prints the handler's stack when a stop is overdue
    (`wiring.process`); a value returned before any wait is the task's result."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def stuck_handler() -> int:
        await gate
        return 1

    async def quick() -> int:
        return 42

    task = start_eagerly(stuck_handler())
    await asyncio.sleep(0)
    assert "stuck_handler" in repr(task)
    assert [f.f_code.co_name for f in task.get_stack()] == ["stuck_handler"]
    gate.set_result(None)
    assert await asyncio.wait_for(task, 5) == 1
    assert await asyncio.wait_for(start_eagerly(quick()), 5) == 42


async def test_an_error_before_any_wait_outranks_a_cancel_before_the_first_turn() -> None:
    async def handler() -> None:
        raise ValueError("at once")

    task = start_eagerly(handler())
    task.cancel()  # too late: it ran and failed, and a task whose coroutine raised ends so
    with pytest.raises(ValueError, match="at once"):
        await asyncio.wait_for(task, 5)
