"""Framing, handshake and misbehaving peers over real loopback sockets."""

from __future__ import annotations

import asyncio
import random
import struct
import time

import lz4.frame
import msgpack
import pytest
import torch

from butterfly.metrics.events import MessageDropped, MessageSent
from butterfly.net.breaker import BreakerState, CircuitBreaker
from butterfly.net.framing import LENGTH, MAX_LZ4_RATIO, Envelope, decode_frame, encode_frame
from butterfly.net.memory import MemoryNetwork
from butterfly.net.tcp import Identity, TcpTransport, TransportLimits
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.types.errors import CircuitOpen, ConnectionFailed, InvalidMessage, WireFormatError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.control import Heartbeat, StatusQuery, StatusReply
from butterfly.types.wire.data import Pong, Release, StageStep
from butterfly.types.wire.frames import to_body

pytestmark = pytest.mark.timeout(60)


class Events(list[object]):
    def __call__(self, event: object) -> None:
        self.append(event)

    def dropped(self) -> int:
        return sum(isinstance(e, MessageDropped) for e in self)


async def echo(peer: NodeId, env: Envelope) -> tuple[StatusReply, bytes] | None:
    if isinstance(env.msg, StatusQuery):
        return StatusReply(7, env.epoch, (0, 2), 1, 0, 1e9, 1 << 30), env.payload
    return None


KEYS = [SigningKey.from_seed(bytes([i + 1]) * 32) for i in range(3)]
"""Node i's key; `KEYS[2]` belongs to no member of the pairs below."""
PUBLIC = {NodeId(i): k.public for i, k in enumerate(KEYS[:2])}


def identity(node: int, model_hash: str = "m", key: SigningKey | None = None) -> Identity:
    """Node `node` of cluster "c", holding `key` (default: its own member key)."""
    return Identity(NodeId(node), "c", model_hash, key=key or KEYS[node], keys=PUBLIC)


def pair(
    model_hash: str = "m", limits: TransportLimits | None = None
) -> tuple[TcpTransport, TcpTransport, Events]:
    limits = limits or TransportLimits()
    # port 0: the OS picks free listen ports; `started` then tells each side the other's
    ports = {NodeId(0): ("127.0.0.1", 0), NodeId(1): ("127.0.0.1", 0)}
    events = Events()
    a = TcpTransport(
        identity=identity(0),
        listen=ports[NodeId(0)],
        peers=ports,
        emit=events,
        epoch=lambda: 3,
        limits=limits,
    )
    b = TcpTransport(
        identity=identity(1, model_hash),
        listen=ports[NodeId(1)],
        peers=ports,
        emit=events,
        epoch=lambda: 3,
        limits=limits,
    )
    return a, b, events


async def started(a: TcpTransport, b: TcpTransport) -> None:
    await a.start(echo)
    await b.start(echo)
    a.peers[b.identity.node] = b.address
    b.peers[a.identity.node] = a.address


def test_frame_round_trip_and_rejection() -> None:
    msg = StageStep(("r1", "r2"), (2, 0), (5, 0), (1, 3), (2, 3), 0, True)
    payload = encode_tensor(torch.randn(1, 1, 8))
    for compression in ("", "lz4"):
        frame = encode_frame(Envelope(msg, 1, 4, "c", 9, False, payload), compression)
        env = decode_frame(frame[LENGTH.size :], 1 << 20)
        assert env.msg == msg and env.epoch == 4 and env.corr_id == 9
        assert torch.equal(decode_tensor(env.payload), decode_tensor(payload))
    header = msgpack.packb(
        {"v": 1, "c": "c", "e": 0, "s": 1, "id": 0, "r": False, "k": "nope", "b": {}, "z": ""}
    )
    with pytest.raises(WireFormatError, match="unknown message kind"):
        decode_frame(struct.pack(">H", len(header)) + header, 1 << 20)
    with pytest.raises(WireFormatError, match="msgpack"):
        decode_frame(b"\x00\x02\xc1\xc1", 1 << 20)
    with pytest.raises(WireFormatError):
        decode_frame(b"\x00", 1 << 20)


async def test_request_reply_and_tensor_payload() -> None:
    a, b, _ = pair()
    try:
        await started(a, b)
        t = torch.randn(1, 128, 768)
        env = await a.request(NodeId(1), StatusQuery(), encode_tensor(t), timeout=5)
        assert isinstance(env.msg, StatusReply) and env.msg.epoch == 3
        assert torch.equal(decode_tensor(env.payload), t)
    finally:
        await a.close()
        await b.close()


async def test_handshake_refuses_a_different_model() -> None:
    a, b, events = pair(model_hash="other", limits=TransportLimits(connect_attempts=1))
    try:
        await started(a, b)
        with pytest.raises(ConnectionFailed, match="model hash"):
            await a.send(NodeId(1), Release(("x",)))
        assert events.dropped() >= 1
    finally:
        await a.close()
        await b.close()


async def test_only_payloads_from_the_threshold_on_are_compressed() -> None:
    limits = TransportLimits(compression="lz4", compression_min_bytes=4096)
    a, b, events = pair(limits=limits)
    try:
        await started(a, b)
        block = random.Random(0).randbytes(10_000)  # ten copies: lz4 shrinks them 10 times
        for payload in (block[:1000], block * 10):
            await a.request(NodeId(1), StatusQuery(), payload, timeout=5)
        kind = StatusQuery.kind
        sent = [e.size_bytes for e in events if isinstance(e, MessageSent) and e.kind == kind]
        small, large = sent  # the frames' sizes, payload included
        assert small > 1000 and large < 20_000
    finally:
        await a.close()
        await b.close()


def test_an_lz4_payload_may_inflate_only_so_many_times_its_size() -> None:
    """16 MiB of zeros travel as 64 KiB: a receiver that inflated them up to the frame
    limit held 250 times what a peer sent it. Such a frame is refused, naming why; an
    honest sender sends so compressible a payload raw."""
    zeros = bytes(16 << 20)
    raw = encode_frame(Envelope(Release(("x",)), 1, 4, "c", 0, False, zeros), "lz4")
    assert len(raw) > len(zeros) and decode_frame(raw[LENGTH.size :], 32 << 20).payload == zeros
    body = to_body(Release(("x",)))
    header = msgpack.packb(
        {"v": 1, "c": "c", "e": 0, "s": 1, "id": 0, "r": False, "k": "release", "b": body}
        | {"z": "lz4"}
    )
    packed = lz4.frame.compress(zeros, compression_level=0)
    hostile = struct.pack(">H", len(header)) + header + packed
    with pytest.raises(WireFormatError, match=f"inflates past {MAX_LZ4_RATIO} times"):
        decode_frame(hostile, 32 << 20)
    with pytest.raises(WireFormatError, match="exceeds 1048576 bytes"):
        decode_frame(hostile, 1 << 20)


async def test_a_connection_stops_reading_while_its_handlers_hold_a_message_of_payloads() -> None:
    """A peer's frames each sit in a handler as long as it runs: 64 of them at the frame
    limit held 16 GiB per connection. Handlers holding `max_message_bytes` of payloads
    stop the reader (TCP slows the sender) until one ends."""
    started_with: list[int] = []
    release = asyncio.Event()

    async def hold(peer: NodeId, env: Envelope) -> None:
        started_with.append(len(env.payload))
        await release.wait()

    limits = TransportLimits(max_frame_bytes=1 << 20, max_message_bytes=1 << 20)
    a, b, _ = pair(limits=limits)
    try:
        await a.start(echo)
        await b.start(hold)
        a.peers[NodeId(1)] = b.address
        for _ in range(8):  # 2 MiB: the loopback socket's buffers take them all
            await a.send(NodeId(1), Release(("x",)), bytes(256 << 10))
        await asyncio.sleep(0.5)
        assert len(started_with) == 4  # 1 MiB held: the reader waits
        release.set()
        for _ in range(100):
            if len(started_with) == 8:
                break
            await asyncio.sleep(0.02)
        assert len(started_with) == 8
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x05hello",  # not msgpack
        b"\x00\x00\x00\x10abc",  # truncated, then the peer hangs up
        b"\xff\xff\xff\xf0" + b"x" * 64,  # length over the frame limit
        LENGTH.pack(3) + b"\x00\x01\x90",  # a header that is not a map
    ],
)
async def test_garbage_frames_are_dropped_and_counted(garbage: bytes) -> None:
    a, b, events = pair(limits=TransportLimits(max_frame_bytes=1 << 20))
    try:
        await started(a, b)
        _reader, writer = await asyncio.open_connection(*b.address)
        writer.write(garbage)
        await writer.drain()
        writer.close()
        for _ in range(100):
            if events.dropped():
                break
            await asyncio.sleep(0.02)
        assert events.dropped() >= 1
        # the node still serves well-formed peers
        env = await a.request(NodeId(1), StatusQuery(), timeout=5)
        assert isinstance(env.msg, StatusReply)
    finally:
        await a.close()
        await b.close()


async def test_unreachable_peer_opens_the_circuit() -> None:
    a, _, _ = pair(
        limits=TransportLimits(connect_attempts=1, breaker_threshold=2, connect_timeout_s=0.5)
    )
    try:
        await a.start(echo)
        for _ in range(2):
            with pytest.raises(ConnectionFailed):
                await a.send(NodeId(1), Heartbeat(NodeId(0), Epoch(0), 0), channel="control")
        with pytest.raises(CircuitOpen):
            await a.send(NodeId(1), Heartbeat(NodeId(0), Epoch(0), 1), channel="control")
    finally:
        await a.close()


async def _circuit_open_to_a_peer_back_up(
    reset: float,
) -> tuple[TcpTransport, TcpTransport, float]:
    """Node 0's circuit to node 1 opened (one dial nobody answered), then node 1 started
    and each told where the other listens; and when the circuit opened."""
    a, b, _ = pair(
        limits=TransportLimits(
            connect_attempts=1, breaker_threshold=1, breaker_reset_s=reset, connect_timeout_s=0.5
        )
    )
    await a.start(echo)
    with pytest.raises(ConnectionFailed):
        await a.send(NodeId(1), Heartbeat(NodeId(0), Epoch(0), 0), channel="control")
    opened = time.monotonic()
    await b.start(echo)
    a.peers[NodeId(1)] = b.address
    b.peers[NodeId(0)] = a.address
    return a, b, opened


async def test_a_peer_that_dials_in_is_tried_again_before_the_reset() -> None:
    """Node 1 was down and node 0's circuit to it opened; node 1 comes back and dials
    node 0 (its heartbeats): node 0 reaches it a quarter of the reset in, not after the
    whole of it. A restarted node was refused the plan that took it back (a CI run)."""
    reset = 2.0
    a, b, opened = await _circuit_open_to_a_peer_back_up(reset)
    try:
        with pytest.raises(CircuitOpen):
            await a.send(NodeId(1), Heartbeat(NodeId(0), Epoch(0), 1), channel="control")
        await asyncio.sleep(reset / 4 + 0.05)
        await b.send(NodeId(0), Heartbeat(NodeId(1), Epoch(0), 0), channel="control")
        for _ in range(100):  # the handshake's end on node 0's side, bounded
            if a._breakers[NodeId(1)].heard_at is not None:
                break
            await asyncio.sleep(0.01)
        env = await a.request(NodeId(1), StatusQuery(), timeout=5)
        assert isinstance(env.msg, StatusReply)
        assert time.monotonic() - opened < reset  # before the circuit's own reset
    finally:
        await a.close()
        await b.close()


def test_circuit_breaker_states() -> None:
    br = CircuitBreaker(threshold=2, reset_after=1.0)
    br.record_failure(0.0)
    assert br.allow(0.1)
    br.record_failure(0.2)
    assert br.state is BreakerState.OPEN and not br.allow(0.5)
    assert br.allow(1.3) and br.state is BreakerState.HALF_OPEN
    br.record_failure(1.4)
    assert br.state is BreakerState.OPEN
    assert br.allow(2.5)
    br.record_success()
    assert br.state is BreakerState.CLOSED
    br.record_failure(3.0)
    br.record_failure(3.1)
    assert not br.allow(3.2)
    br.heard(3.2)  # the peer dialled in, too soon after the circuit opened to try it
    assert not br.allow(3.3) and br.state is BreakerState.OPEN
    # remembered: a quarter of reset_after in, calls are tried (not at 4.1)
    assert br.allow(3.4) and br.state is BreakerState.HALF_OPEN
    br.record_failure(3.5)
    assert not br.allow(3.8)  # the dial-in was before this opening: wait it out again
    assert br.allow(4.5)


def test_a_peer_that_keeps_dialling_in_gets_few_trials() -> None:
    """A member that takes dials and fails them, and redials after each failure: each
    dial-in half-opened the circuit at once, and no call ever failed fast (a review).
    Now one half-open spell per quarter of reset_after at most."""
    b = CircuitBreaker(threshold=1, reset_after=60.0)
    spells = 0
    for t in range(60):
        if b.state is not BreakerState.OPEN:  # the call tried (or the first) failed
            b.record_failure(float(t))
        b.heard(float(t))
        spells += any([b.allow(float(t)) for _ in range(5)])
    assert spells <= 4


async def _opened_then_back(reset: float) -> tuple[TcpTransport, TcpTransport]:
    """`_circuit_open_to_a_peer_back_up`, and `reset` seconds later: the circuit
    half-opens on the next call."""
    a, b, _ = await _circuit_open_to_a_peer_back_up(reset)
    await asyncio.sleep(reset + 0.05)
    return a, b


@pytest.mark.parametrize("channels", [("control", "control"), ("data", "control")])
async def test_calls_to_a_peer_back_up_all_answer_while_the_circuit_is_half_open(
    channels: tuple[str, str],
) -> None:
    """Two calls at once as the circuit half-opens: the second was refused (CircuitOpen)
    while the first one's dial ran, on its channel or another, and a rollout counted a
    healthy restarted node as down (a review)."""
    a, b = await _opened_then_back(0.3)
    try:
        results = await asyncio.gather(
            *(a.request(NodeId(1), StatusQuery(), timeout=5, channel=c) for c in channels),
            return_exceptions=True,
        )
        assert all(isinstance(r, Envelope) for r in results), results
    finally:
        await a.close()
        await b.close()


async def test_a_peer_that_dialled_in_early_is_reached_a_quarter_in() -> None:
    """A restarted node dials in once and keeps its connections: a dial-in before a
    quarter of reset_after was forgotten, and the circuit stayed open all of it."""
    reset = 2.0
    a, b, opened = await _circuit_open_to_a_peer_back_up(reset)
    try:
        await b.send(NodeId(0), Heartbeat(NodeId(1), Epoch(0), 0), channel="control")
        await asyncio.sleep(reset / 4 + 0.1)
        env = await a.request(NodeId(1), StatusQuery(), timeout=5)
        assert isinstance(env.msg, StatusReply)
        assert time.monotonic() - opened < reset
    finally:
        await a.close()
        await b.close()


async def test_memory_transport_request_reply() -> None:
    net = MemoryNetwork()
    a = net.transport(NodeId(0), Events())
    b = net.transport(NodeId(1), Events())
    await a.start(echo)
    await b.start(echo)
    env = await a.request(NodeId(1), StatusQuery(), b"xyz", timeout=1)
    assert isinstance(env.msg, StatusReply) and env.payload == b"xyz"
    net.down.add(NodeId(1))
    with pytest.raises(ConnectionFailed):
        await a.send(NodeId(1), Release(("r",)))


async def wrong_kind(peer: NodeId, env: Envelope) -> tuple[Pong, bytes] | None:
    """A peer that answers every request with a pong."""
    return Pong(0, 0), b""


async def test_ask_returns_the_declared_reply_over_both_transports() -> None:
    a, b, _ = pair()
    net = MemoryNetwork()
    m0, m1 = net.transport(NodeId(0), Events()), net.transport(NodeId(1), Events())
    try:
        await started(a, b)
        await m0.start(echo)
        await m1.start(echo)
        for t in (a, m0):
            status, payload = await t.ask(NodeId(1), StatusQuery(), b"xyz", timeout=5)
            assert status.node == 7 and payload == b"xyz"  # typed: no isinstance needed
    finally:
        await a.close()
        await b.close()


async def test_a_reply_of_the_wrong_kind_is_invalid_and_blames_the_peer() -> None:
    a, b, _ = pair()
    net = MemoryNetwork()
    m0, m1 = net.transport(NodeId(0), Events()), net.transport(NodeId(1), Events())
    try:
        await a.start(echo)
        await b.start(wrong_kind)
        a.peers[b.identity.node] = b.address
        b.peers[a.identity.node] = a.address
        await m0.start(echo)
        await m1.start(wrong_kind)
        for t in (a, m0):
            with pytest.raises(InvalidMessage, match="answered status_query with pong") as info:
                await t.ask(NodeId(1), StatusQuery(), timeout=5)
            assert info.value.blame == NodeId(1)
    finally:
        await a.close()
        await b.close()
