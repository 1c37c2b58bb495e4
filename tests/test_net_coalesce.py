"""Short frames sent in one turn of the event loop leave a connection in one write, in
order; a long frame, or a message a token waits on (`LATENCY_BOUND`: a step), goes out
at once, after them; a close writes what waits first (net.conn.COALESCE_BELOW)."""

from __future__ import annotations

import asyncio

from butterfly.metrics.events import discard
from butterfly.net.conn import COALESCE_BELOW, Connection
from butterfly.net.framing import Envelope, encode_frame
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.wire.data import Release, StageStep

FRAME = 1 << 20


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0


class _Recorder:
    """The write side of a socket: what the connection wrote, write by write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.transport = _Transport()

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def _nothing(peer: NodeId, env: Envelope) -> None:
    return None


def connection(writer: _Recorder) -> Connection:
    return Connection(
        asyncio.StreamReader(),
        writer,  # type: ignore[arg-type]
        peer=NodeId(1),
        node=NodeId(0),
        cluster_id="c",
        epoch=lambda: Epoch(2),
        handler=_nothing,
        emit=discard,
        max_frame=FRAME,
    )


def frame(msg: Release | StageStep, payload: bytes = b"") -> bytes:
    return encode_frame(Envelope(msg, NodeId(0), Epoch(2), "c", 0, False, payload))


def release(i: int) -> Release:
    return Release((RequestId(f"r{i}"),))


async def test_short_frames_of_one_turn_are_one_write_in_order() -> None:
    writer = _Recorder()
    conn = connection(writer)
    for i in range(5):
        await conn.send(release(i))
    assert writer.writes == []  # not yet: at the end of this turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert writer.writes == [b"".join(frame(release(i)) for i in range(5))]


async def test_a_long_frame_goes_at_once_after_the_short_ones_waiting() -> None:
    writer = _Recorder()
    conn = connection(writer)
    big = b"x" * COALESCE_BELOW
    await conn.send(release(0))
    await conn.send(release(1), big)
    assert writer.writes == [frame(release(0)), frame(release(1), big)]  # order kept
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(writer.writes) == 2  # nothing left over


async def test_a_step_goes_at_once_after_the_short_frames_waiting() -> None:
    writer = _Recorder()
    conn = connection(writer)
    step = StageStep((RequestId("r"),), (3,), (9,), (1,), (NodeId(2),), NodeId(0), True)
    await conn.send(release(0))
    await conn.send(step, b"activations")
    assert writer.writes == [frame(release(0)) + frame(step, b"activations")]  # one write
    await conn.send(release(1))
    assert len(writer.writes) == 1  # what follows it waits for the turn's end again
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert writer.writes[1:] == [frame(release(1))]


async def test_a_close_writes_what_waits_first() -> None:
    writer = _Recorder()
    conn = connection(writer)
    await conn.send(release(7))
    conn.close("done")
    assert writer.writes == [frame(release(7))] and writer.closed
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(writer.writes) == 1
