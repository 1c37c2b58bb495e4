"""A connection's handlers against the connection that runs them: a handler's own
timeout, or a stalled next node it relays to, ends that handler's send and never the
connection it came in on; a handler that closes its own connection is cancelled with it.
These held for handlers run as tasks, and are what a faster start of a handler broke
first (the eighteenth session's `net.eager`, since dropped: docs/PERFORMANCE-LOG.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from butterfly.metrics.events import discard
from butterfly.net.conn import Connection, Reply
from butterfly.net.framing import Envelope, encode_frame
from butterfly.types.errors import SendTimeout
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.wire.data import Release

Handler = Callable[[NodeId, Envelope], Awaitable[Reply | None]]


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


async def _nothing(peer: NodeId, env: Envelope) -> Reply | None:
    return None


async def _one_frame(conn: Connection, seen: list[str]) -> bool:
    """Run `conn`'s reader, feed it a frame and wait (at most 2 s) for its handler to note
    something in `seen`; whether the connection was still open and reading then."""
    reader = asyncio.create_task(conn.run())
    try:
        frame = Envelope(Release((RequestId("a"),)), NodeId(0), Epoch(1), "c", 0, False, b"")
        conn._reader.feed_data(encode_frame(frame))
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        return not conn.closed and not reader.done()
    finally:
        reader.cancel()


async def test_a_relay_to_a_stalled_next_node_fails_that_send_not_the_incoming_connection() -> None:
    """A middle node's step handler sends its output on; when the next node takes no
    data, that send times out (`asyncio.timeout` around the drain) and that connection is
    aborted, while the one the step came in on, from an innocent node, reads on."""
    outcome: list[str] = []
    downstream = _connection(_nothing, _Writer(stalled=True), peer=2)

    async def relay(peer: NodeId, env: Envelope) -> Reply | None:
        try:
            await downstream.send(Release((RequestId("r"),)))
        except SendTimeout:
            outcome.append("send timed out")
        return None

    reading = await _one_frame(_connection(relay, _Writer(), peer=0), outcome)
    assert outcome == ["send timed out"]
    assert downstream.closed
    assert reading


async def test_a_handlers_own_timeout_ends_the_handler_not_the_connection() -> None:
    """A handler that gives up on something (a plan not yet agreed, a step for an epoch
    not reached) under `asyncio.timeout` ends alone; its connection reads on."""
    outcome: list[str] = []

    async def handler(peer: NodeId, env: Envelope) -> Reply | None:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.get_running_loop().create_future()
        except TimeoutError:
            outcome.append("timed out")
        return None

    reading = await _one_frame(_connection(handler, _Writer(), peer=0), outcome)
    assert outcome == ["timed out"]
    assert reading


async def test_a_handler_that_closes_its_own_connection_is_cancelled_with_it() -> None:
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

    box.append(_connection(handler, _Writer(), peer=0))
    reading = await _one_frame(box[0], seen)
    assert seen == ["cancelled"]
    assert not reading
