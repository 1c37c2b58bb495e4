"""Messages over the frame limit travel in chunks; a peer cannot lift the bounds.

Chunking round trips over the in-memory and the TCP transport, the sender's refusal of a
message over the message limit, the receiver's refusal of a declared size over it
(before buffering anything, blaming the sender), and per-connection backpressure.
"""

from __future__ import annotations

import asyncio

import pytest

from butterfly.metrics.events import MessageDropped, MessageSent, PeerError
from butterfly.net.conn import Connection
from butterfly.net.framing import (
    LENGTH,
    Envelope,
    Reassembly,
    chunk_frames,
    decode_frame,
    encode_frame,
)
from butterfly.net.memory import MemoryNetwork
from butterfly.net.tcp import Identity, TcpTransport, TransportLimits
from butterfly.types.errors import ConnectionFailed, MessageTooLarge, WireFormatError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.control import StatusQuery, StatusReply
from butterfly.types.wire.data import Chunk, Release
from tests.test_net import KEYS, PUBLIC

pytestmark = pytest.mark.timeout(60)

FRAME = 1 << 16
BIG = bytes(range(256)) * (3 * FRAME // 256)  # three frame limits of payload


class Events(list[object]):
    def __call__(self, event: object) -> None:
        self.append(event)

    def of(self, cls: type[object]) -> list[object]:
        return [e for e in self if isinstance(e, cls)]


async def echo(peer: NodeId, env: Envelope) -> tuple[StatusReply, bytes] | None:
    if isinstance(env.msg, StatusQuery):
        return StatusReply(peer, env.epoch, (0, 2), 1, 0, 1e9, 1 << 30), env.payload
    return None


def transport(node: int, limits: TransportLimits, events: Events) -> TcpTransport:
    ports = {NodeId(0): ("127.0.0.1", 0), NodeId(1): ("127.0.0.1", 0)}
    return TcpTransport(
        identity=Identity(NodeId(node), "c", "m", key=KEYS[node], keys=PUBLIC),
        listen=ports[NodeId(node)],
        peers=ports,
        emit=events,
        epoch=lambda: Epoch(3),
        limits=limits,
    )


async def started(a: TcpTransport, b: TcpTransport, handler: object = echo) -> None:
    await a.start(echo)
    await b.start(handler)  # type: ignore[arg-type]
    a.peers[b.identity.node] = b.address
    b.peers[a.identity.node] = a.address


def test_a_message_is_cut_into_chunks_that_fit_and_put_back_together() -> None:
    env = Envelope(StatusQuery(), NodeId(1), Epoch(2), "c", 7, False, BIG)
    frame = encode_frame(env)
    frames = chunk_frames(env, frame, stream=1, max_frame=FRAME, max_message=1 << 20)
    assert len(frames) == 4 and all(len(f) - LENGTH.size <= FRAME for f in frames)
    reassembly, whole = Reassembly(1 << 20), None
    for piece in frames:
        chunk = decode_frame(piece[LENGTH.size :], FRAME)
        assert isinstance(chunk.msg, Chunk)
        whole = reassembly.add(chunk.msg, chunk.payload)
    assert whole == frame[LENGTH.size :]


def test_a_declared_size_over_the_limit_is_refused_before_buffering() -> None:
    reassembly = Reassembly(1 << 20)
    with pytest.raises(MessageTooLarge, match="max_message_bytes"):
        reassembly.add(Chunk(1, 0, 1 << 40, False), b"x" * 100)
    assert reassembly.buffered == 0


@pytest.mark.parametrize(
    "chunks",
    [
        [Chunk(1, 1, 10, True)],  # no start
        [Chunk(1, 0, 10, False), Chunk(2, 1, 10, True)],  # another stream mid-message
        [Chunk(1, 0, 10, False), Chunk(1, 2, 10, True)],  # a gap
        [Chunk(1, 0, 4, False), Chunk(1, 1, 4, False)],  # past the declared total
        [Chunk(1, 0, 10, False), Chunk(1, 1, 10, False)],  # complete, not marked final
    ],
)
def test_chunks_that_break_the_rules_are_refused(chunks: list[Chunk]) -> None:
    reassembly = Reassembly(1 << 20)
    with pytest.raises(WireFormatError):
        for chunk in chunks:
            reassembly.add(chunk, b"12345")


async def test_three_frame_limits_round_trip_in_memory() -> None:
    net = MemoryNetwork(max_frame_bytes=FRAME, max_message_bytes=1 << 20)
    a = net.transport(NodeId(0), Events())
    b = net.transport(NodeId(1), Events())
    await a.start(echo)
    await b.start(echo)
    reply, payload = await a.ask(NodeId(1), StatusQuery(), BIG, timeout=5)
    assert reply.node == 0 and payload == BIG
    with pytest.raises(MessageTooLarge, match="max_message_bytes"):
        await a.send(NodeId(1), Release(("r",)), bytes(2 << 20))
    await a.close()
    await b.close()


async def test_three_frame_limits_round_trip_over_tcp_as_chunks() -> None:
    events = Events()
    limits = TransportLimits(max_frame_bytes=FRAME, max_message_bytes=1 << 20)
    a, b = transport(0, limits, events), transport(1, limits, events)
    try:
        await started(a, b)
        env = await a.request(NodeId(1), StatusQuery(), BIG, timeout=5)
        assert isinstance(env.msg, StatusReply) and env.payload == BIG  # the reply too
        small = await a.request(NodeId(1), StatusQuery(), b"x", timeout=5)
        assert small.payload == b"x"
        assert not events.of(MessageDropped)
    finally:
        await a.close()
        await b.close()


async def test_the_sender_refuses_a_message_over_the_limit_naming_it() -> None:
    events = Events()
    limits = TransportLimits(max_frame_bytes=FRAME, max_message_bytes=4 * FRAME)
    a, b = transport(0, limits, events), transport(1, limits, events)
    try:
        await started(a, b)
        with pytest.raises(MessageTooLarge, match=r"network\.max_message_bytes"):
            await a.send(NodeId(1), Release(("r",)), bytes(5 * FRAME))
        sent = [e for e in events.of(MessageSent) if getattr(e, "kind", "") == Release.kind]
        assert not sent
        env = await a.request(NodeId(1), StatusQuery(), timeout=5)  # the connection lives
        assert isinstance(env.msg, StatusReply)
    finally:
        await a.close()
        await b.close()


async def test_a_peer_declaring_too_much_is_cut_off_and_blamed() -> None:
    """A sender configured with a larger limit than the receiver plays the hostile peer:
    its chunk stream declares more than the receiver takes, so the receiver refuses the
    first chunk, blames that sender and closes the connection; the sender's request fails
    at once (ConnectionFailed), never as a timeout charged to anyone else."""
    events = Events()
    loose = TransportLimits(max_frame_bytes=FRAME, max_message_bytes=1 << 24)
    strict = TransportLimits(max_frame_bytes=FRAME, max_message_bytes=2 * FRAME)
    a, b = transport(0, loose, events), transport(1, strict, events)
    try:
        await started(a, b)
        with pytest.raises(ConnectionFailed):
            await a.request(NodeId(1), StatusQuery(), bytes(1 << 23), timeout=30)
        assert any(getattr(e, "reason", "") == "oversized" for e in events.of(MessageDropped))
        blamed = events.of(PeerError)
        assert blamed and all(getattr(e, "node", None) == 0 for e in blamed)
    finally:
        await a.close()
        await b.close()


async def test_a_flooding_peer_gets_at_most_the_handler_bound_in_flight() -> None:
    events = Events()
    limits = TransportLimits(max_handlers=4)
    a, b = transport(0, limits, events), transport(1, limits, events)
    gate = asyncio.Event()
    running, peak, done = 0, 0, 0

    async def slow(peer: NodeId, env: Envelope) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        done += 1

    try:
        await started(a, b, slow)
        for i in range(200):
            await a.send(NodeId(1), Release((f"r{i}",)))
        for _ in range(100):  # the first four start; the reader then waits for a slot
            if running == 4:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert running == peak == 4
        gate.set()
        for _ in range(500):
            if done == 200:
                break
            await asyncio.sleep(0.01)
        assert done == 200 and peak == 4
    finally:
        await a.close()
        await b.close()


def test_a_chunk_stream_has_a_deadline_and_dropping_it_frees_its_buffer() -> None:
    now = [100.0]
    reassembly = Reassembly(1 << 20, stall_s=5.0, min_rate=1000.0, clock=lambda: now[0])
    env = Envelope(StatusQuery(), NodeId(1), Epoch(2), "c", 7, False, BIG)
    frames = [
        decode_frame(f[LENGTH.size :], FRAME)
        for f in chunk_frames(
            env, encode_frame(env), stream=1, max_frame=FRAME, max_message=1 << 20
        )
    ]
    first = frames[0].msg
    assert isinstance(first, Chunk) and reassembly.deadline is None
    assert reassembly.add(first, frames[0].payload) is None
    assert reassembly.deadline == 100.0 + 5.0 + first.total / 1000.0
    held = reassembly.buffered
    assert held == len(frames[0].payload) and reassembly.drop() == held
    assert reassembly.buffered == 0 and reassembly.deadline is None
    second = frames[1].msg
    assert isinstance(second, Chunk)
    with pytest.raises(WireFormatError, match="no start"):  # the dropped stream is gone
        reassembly.add(second, frames[1].payload)


class _Writer:
    """The write side of a socket nobody writes to: the connection only closes it."""

    def close(self) -> None:
        self.closed = True


async def test_a_peer_that_stalls_half_way_through_a_chunked_message_is_dropped() -> None:
    """The peer sends the first chunk of a four-chunk message and nothing more: once the
    stream's deadline passes, the buffer is dropped and counted, and the connection to
    that peer (only) is closed; nobody is blamed."""
    events = Events()
    env = Envelope(StatusQuery(), NodeId(1), Epoch(2), "c", 0, False, BIG)
    frames = chunk_frames(env, encode_frame(env), stream=1, max_frame=FRAME, max_message=1 << 20)
    reader = asyncio.StreamReader()
    reader.feed_data(frames[0])
    handled: list[Envelope] = []

    async def handler(peer: NodeId, e: Envelope) -> None:
        handled.append(e)

    conn = Connection(
        reader,
        _Writer(),  # type: ignore[arg-type]
        peer=NodeId(1),
        node=NodeId(0),
        cluster_id="c",
        epoch=lambda: Epoch(2),
        handler=handler,
        emit=events,
        max_frame=FRAME,
        max_message=1 << 20,
        chunk_stall_s=0.0,  # deadline: the transfer at 1 MiB/s, a fraction of a second
    )
    await asyncio.wait_for(conn.run(), 30)
    assert conn.closed and "stalled a chunked message" in conn.close_reason
    assert [getattr(e, "reason", "") for e in events.of(MessageDropped)] == ["chunks_stalled"]
    assert not events.of(PeerError) and not handled
