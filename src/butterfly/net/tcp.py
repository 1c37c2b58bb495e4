"""The network transport: asyncio streams over TCP, two channels per peer.

Measured before choosing (MEASUREMENTS.md and `bench/transport.py`): asyncio streams
cost ~20 µs more per round trip than a blocking socket and less than pyzmq or gRPC, and
they let votes, plans and tensors share one event loop without extra threads. Votes
and plans use the `control` channel, tensors the `data` channel, so a vote is never
queued behind a large tensor (heartbeats have their own UDP path: control.heartbeats).
With `tls`, both channels run over mutual TLS (net.tls). Whether or not TLS is on, every
connection starts with a handshake in which both ends prove their node keys
(net.handshake); frames before it are limited to a few KiB.

Incoming connections are kept in two budgets. Before its handshake a connection is
anyone's: at most `max_connections` of them wait (each at most `connect_timeout_s`), and
one more closes the oldest waiting, so outsiders holding idle sockets cannot keep a
member from proving its key (a member's handshake is one round trip). After it, a
connection is a member's on one channel: it counts against no cap, and the member's
next proven connection on that channel replaces it. A link cut without a FIN or RST
leaves the old one open on this side; the member's redial closes it, and TCP keepalive
(`KEEPALIVE`) closes it when the member does not come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from butterfly.metrics.events import Emit, MessageDropped
from butterfly.net.breaker import CircuitBreaker
from butterfly.net.conn import MAX_HANDLERS, Connection, Handler
from butterfly.net.framing import CHUNK_STALL_S, Envelope, answer_to, as_message
from butterfly.net.handshake import (
    MAX_HANDSHAKE_FRAME,
    NONCE_BYTES,
    Direction,
    Signer,
    dialer_refusal,
    opening_refusal,
    proof_bytes,
    verify,
)
from butterfly.net.tls import TlsContexts, cert_node, node_name
from butterfly.types.errors import CircuitOpen, ConnectionFailed, InvalidMessage, WireFormatError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.base import PROTOCOL_VERSION, Ask
from butterfly.types.wire.control import Hello, HelloAck
from butterfly.types.wire.frames import Message

log = logging.getLogger(__name__)
R = TypeVar("R")
CHANNELS = ("control", "data")
KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
"""TCP keepalive on every peer socket: probed after 10 s idle, every 5 s, dropped after 3
unanswered, so a connection whose peer vanished without a FIN or RST (a pulled cable, a
powered-off host) closes within about 25 s instead of never: its reader read for ever."""


@dataclass(frozen=True)
class Identity:
    """What a handshake checks: same protocol, same cluster, same model, and each end's
    node key. `keys`: every member's public key (`cluster.public_keys`); a peer without
    one is refused whatever else it knows."""

    node: NodeId
    cluster_id: str
    model_hash: str
    key: Signer
    keys: Mapping[NodeId, bytes]


@dataclass(frozen=True)
class TransportLimits:
    max_frame_bytes: int = 256 * 1024 * 1024
    max_message_bytes: int = 1024 * 1024 * 1024  # larger than a frame: sent in chunks
    max_handlers: int = MAX_HANDLERS  # per connection; the reader waits beyond
    connect_timeout_s: float = 2.0
    connect_attempts: int = 3
    retry_backoff_s: float = 0.05  # first wait between connect attempts, doubled each time
    retry_max_backoff_s: float = 0.5
    breaker_threshold: int = 5
    breaker_reset_s: float = 1.0
    compression: str = ""  # "" or "lz4", for tensor payloads
    compression_min_bytes: int = 4096  # smaller payloads go uncompressed
    send_timeout_s: float = 1.0  # a frame the peer does not take within this fails
    chunk_stall_s: float = CHUNK_STALL_S  # slack of a chunked message (net.framing)
    max_connections: int = 100  # incoming ones awaiting their handshake; more close the oldest


def _address(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def keep_alive(writer: asyncio.StreamWriter) -> None:
    """Turn on `KEEPALIVE` where the platform has the options (Linux has all three)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in KEEPALIVE:
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


async def _refuse(peer: NodeId, env: Envelope) -> None:
    raise ConnectionFailed("transport not started")


class TcpTransport:
    def __init__(
        self,
        *,
        identity: Identity,
        listen: tuple[str, int],
        peers: Mapping[NodeId, tuple[str, int]],
        emit: Emit,
        epoch: Callable[[], Epoch],
        limits: TransportLimits = TransportLimits(),
        tls: TlsContexts | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`tls`: mutual TLS with the cluster CA's certificates (net.tls); None = plain TCP.
        `sleep`: how a dial waits between connect attempts (a test records the waits)."""
        self.identity, self.listen, self.peers = identity, listen, dict(peers)
        self._sleep = sleep
        self._emit, self._epoch, self.limits, self._tls = emit, epoch, limits, tls
        self._handler: Handler = _refuse
        self._out: dict[tuple[NodeId, str], Connection] = {}
        self._connecting: dict[tuple[NodeId, str], asyncio.Lock] = {}
        self._breakers = {
            p: CircuitBreaker(limits.breaker_threshold, limits.breaker_reset_s) for p in self.peers
        }
        self._incoming: set[Connection] = set()  # every accepted one still open
        self._unproven: dict[Connection, None] = {}  # before their handshake, oldest first
        self._proven: dict[tuple[NodeId, str], Connection] = {}  # a member's, per channel
        self._readers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, handler: Handler) -> None:
        """Serve incoming frames with `handler` (given here, so a node can be built
        before its dispatcher exists without a half-initialised object)."""
        self._handler = handler
        host, port = self.listen
        ssl = self._tls.server if self._tls else None
        self._server = await asyncio.start_server(self._accept, host, port, ssl=ssl)

    def set_peers(self, peers: Mapping[NodeId, str]) -> None:
        """Who may connect and be dialled; a removed member's open connections close now
        (its key is gone from `identity.keys` too, so it cannot handshake again)."""
        self.peers = {n: _address(a) for n, a in peers.items()}
        limits = self.limits
        for peer in self.peers:
            if peer not in self._breakers:
                self._breakers[peer] = CircuitBreaker(
                    limits.breaker_threshold, limits.breaker_reset_s
                )
        for key in [k for k in self._out if k[0] not in self.peers]:
            self._out.pop(key).close("removed from the cluster")
        for conn in [c for c in self._incoming if c.peer >= 0 and c.peer not in self.peers]:
            conn.close("removed from the cluster")

    @property
    def address(self) -> tuple[str, int]:
        """Where this transport actually listens (the OS picks the port for port 0)."""
        if self._server is None or not self._server.sockets:
            return self.listen
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        conns = [*self._out.values(), *self._incoming]
        for conn in conns:
            conn.close("transport closed")
        for task in list(self._readers):
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await asyncio.gather(*(c.wait_closed() for c in conns))
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def _spawn_reader(self, conn: Connection) -> None:
        task = asyncio.create_task(conn.run())
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: NodeId
    ) -> Connection:
        return Connection(
            reader,
            writer,
            peer=peer,
            node=self.identity.node,
            cluster_id=self.identity.cluster_id,
            epoch=self._epoch,
            handler=self._handler,
            emit=self._emit,
            max_frame=self.limits.max_frame_bytes,
            max_message=self.limits.max_message_bytes,
            max_handlers=self.limits.max_handlers,
            compression=self.limits.compression,
            compression_min_bytes=self.limits.compression_min_bytes,
            send_timeout_s=self.limits.send_timeout_s,
            chunk_stall_s=self.limits.chunk_stall_s,
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        keep_alive(writer)
        conn = self._connection(reader, writer, NodeId(-1))
        certified = cert_node(writer.get_extra_info("peercert")) if self._tls else None
        self._make_room()
        self._incoming.add(conn)
        self._unproven[conn] = None
        try:
            await self._serve_incoming(conn, certified)
        finally:
            self._incoming.discard(conn)
            self._unproven.pop(conn, None)
            conn.close("done")
            await conn.wait_closed()

    def _make_room(self) -> None:
        """Close the oldest connections awaiting their handshake beyond
        `max_connections`, rather than refuse the new one: refusing let outsiders that
        hold idle sockets lock every member out, while the oldest of them is the one that
        had the longest to prove a key and has not."""
        while len(self._unproven) >= self.limits.max_connections:
            oldest = next(iter(self._unproven))
            del self._unproven[oldest]
            self._emit(MessageDropped(reason="too_many_connections"))
            log.warning(
                "closed a connection that had not completed its handshake: %d awaiting one "
                "(network.max_connections)",
                self.limits.max_connections,
            )
            oldest.close("too many connections awaiting their handshake", abort=True)

    def _replace(self, conn: Connection, channel: str) -> tuple[NodeId, str]:
        """Make `conn` its member's connection on `channel`, closing the one before: a
        member dials a channel again only once it has dropped its connection, and the
        old one may be open here still (a link cut without a FIN or RST)."""
        key = (conn.peer, channel)
        older, self._proven[key] = self._proven.get(key), conn
        if older is not None and older is not conn:
            log.info("node %s dialled its %s channel again; closing the older", *key)
            older.close(f"node {conn.peer} connected its {channel} channel again", abort=True)
        return key

    async def _serve_incoming(self, conn: Connection, certified: int | None) -> None:
        me = self.identity
        nonce = os.urandom(NONCE_BYTES)
        try:
            await conn.send(Hello(me.node, me.cluster_id, me.model_hash, "", nonce))
            env = await asyncio.wait_for(
                conn.read_frame(MAX_HANDSHAKE_FRAME), self.limits.connect_timeout_s
            )
        except (
            ConnectionFailed,
            WireFormatError,
            TimeoutError,
            asyncio.IncompleteReadError,
            OSError,
        ) as e:
            if conn.closed:  # closed for a newer one (`_make_room`), counted there
                return
            self._emit(MessageDropped(reason="handshake"))
            log.warning("refused a connection: bad handshake (%s)", e)
            conn.close("bad handshake")
            return
        reason = self._refusal(env, nonce)
        if not reason and self._tls and certified != getattr(env.msg, "node", None):
            reason = f"its TLS certificate is for node {certified}, not the node it claims"
        hello = env.msg
        if reason or not isinstance(hello, Hello):
            self._emit(MessageDropped(reason="handshake_refused"))
            claimed = getattr(hello, "node", "?")
            log.warning("refused a connection claiming node %s: %s", claimed, reason)
            with contextlib.suppress(ConnectionFailed):
                await conn.send(HelloAck(me.node, False, reason))  # never signed
                await asyncio.sleep(0.05)
            conn.close(reason)
            return
        signed = proof_bytes(
            cluster_id=me.cluster_id,
            model_hash=me.model_hash,
            channel=hello.channel,
            dialer=hello.node,
            acceptor=me.node,
            dialer_nonce=hello.nonce,
            acceptor_nonce=nonce,
            direction="accept",
        )
        self._unproven.pop(conn, None)
        if conn.closed:
            return
        conn.peer = hello.node
        breaker = self._breakers.get(hello.node)
        if breaker is not None:
            breaker.heard(time.monotonic())
        key = self._replace(conn, hello.channel)
        try:
            await conn.send(HelloAck(me.node, True, "", me.key.sign(signed)))
            await conn.run()
        except ConnectionFailed:
            return
        finally:
            if self._proven.get(key) is conn:
                del self._proven[key]

    def _refusal(self, env: Envelope, nonce: bytes) -> str:
        """Why the dialer's Hello is refused, or "" to accept it (its key proven)."""
        hello, me = env.msg, self.identity
        if not isinstance(hello, Hello):
            return f"expected hello, got {hello.kind}"
        if env.version != PROTOCOL_VERSION:
            return f"protocol version {env.version}, this node speaks {PROTOCOL_VERSION}"
        if hello.node not in self.peers:
            return f"node {hello.node} is not a member of this cluster"
        if hello.channel not in CHANNELS:
            return f"unknown channel {hello.channel!r}"
        return dialer_refusal(
            hello,
            acceptor=me.node,
            acceptor_nonce=nonce,
            cluster_id=me.cluster_id,
            model_hash=me.model_hash,
            keys=me.keys,
        )

    async def _connect(self, peer: NodeId, channel: str) -> Connection:
        if peer not in self.peers:
            raise ConnectionFailed(f"node {peer} is not a member of this cluster", blame=peer)
        host, port = self.peers[peer]
        ssl, name = (self._tls.client, node_name(peer)) if self._tls else (None, None)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl, server_hostname=name),
                self.limits.connect_timeout_s,
            )
        except (OSError, TimeoutError) as e:
            raise ConnectionFailed(f"cannot connect to node {peer} at {host}:{port}: {e}") from e
        keep_alive(writer)
        conn = self._connection(reader, writer, peer)
        try:
            await self._handshake(conn, peer, channel)
        except BaseException:
            conn.close("handshake failed")
            raise
        self._spawn_reader(conn)
        return conn

    async def _handshake(self, conn: Connection, peer: NodeId, channel: str) -> None:
        """Answer the acceptor's challenge with ours signed, then check its signature."""
        me, timeout = self.identity, self.limits.connect_timeout_s
        try:
            env = await asyncio.wait_for(conn.read_frame(MAX_HANDSHAKE_FRAME), timeout)
            opening = env.msg
            if not isinstance(opening, Hello):
                raise InvalidMessage(f"node {peer} opened with {opening.kind}, not hello")
            if env.version != PROTOCOL_VERSION:
                raise InvalidMessage(
                    f"node {peer} speaks protocol {env.version}, this node {PROTOCOL_VERSION}"
                )
            refusal = opening_refusal(
                opening, peer=peer, cluster_id=me.cluster_id, model_hash=me.model_hash
            )
            if refusal:
                raise InvalidMessage(refusal, blame=peer)
            nonce = os.urandom(NONCE_BYTES)

            def proof(direction: Direction) -> bytes:
                return proof_bytes(
                    cluster_id=me.cluster_id,
                    model_hash=me.model_hash,
                    channel=channel,
                    dialer=me.node,
                    acceptor=peer,
                    dialer_nonce=nonce,
                    acceptor_nonce=opening.nonce,
                    direction=direction,
                )

            signature = me.key.sign(proof("dial"))
            hello = Hello(me.node, me.cluster_id, me.model_hash, channel, nonce, signature)
            await conn.send(hello)
            env = await asyncio.wait_for(conn.read_frame(MAX_HANDSHAKE_FRAME), timeout)
            ack = answer_to(hello, env.msg, peer)
        except (WireFormatError, TimeoutError, asyncio.IncompleteReadError, OSError) as e:
            raise ConnectionFailed(f"node {peer} did not complete the handshake: {e}") from e
        except InvalidMessage as e:
            self._emit(MessageDropped(reason="handshake_refused"))
            raise ConnectionFailed(f"refused node {peer}'s handshake: {e}", blame=peer) from e
        if not ack.accepted:
            raise ConnectionFailed(f"node {peer} refused the handshake: {ack.reason}", blame=peer)
        key = me.keys.get(peer)
        if key is None or not verify(key, ack.signature, proof("accept")):
            self._emit(MessageDropped(reason="handshake_refused"))
            raise ConnectionFailed(
                f"node {peer}'s handshake does not prove its key (cluster.public_keys)",
                blame=peer,
            )

    @staticmethod
    def _through_circuit(peer: NodeId, breaker: CircuitBreaker | None) -> None:
        if breaker is not None and not breaker.allow(time.monotonic()):
            raise CircuitOpen(f"circuit to node {peer} is open after repeated failures")

    async def connection(self, peer: NodeId, channel: str = "data") -> Connection:
        key = (peer, channel)
        conn = self._out.get(key)
        if conn is not None and not conn.closed:
            return conn
        breaker = self._breakers.get(peer)
        self._through_circuit(peer, breaker)
        lock = self._connecting.setdefault(key, asyncio.Lock())
        async with lock:  # one dial per channel at a time; the calls behind it reuse it
            conn = self._out.get(key)
            if conn is not None and not conn.closed:
                return conn
            self._through_circuit(peer, breaker)  # the dial before may have failed
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(ConnectionFailed),
                    stop=stop_after_attempt(self.limits.connect_attempts),
                    wait=wait_exponential_jitter(
                        multiplier=self.limits.retry_backoff_s,
                        max=self.limits.retry_max_backoff_s,
                        jitter=self.limits.retry_backoff_s,
                    ),
                    reraise=True,
                    sleep=self._sleep,
                ):
                    with attempt:
                        conn = await self._connect(peer, channel)
            except ConnectionFailed:
                if breaker is not None:
                    breaker.record_failure(time.monotonic())
                raise
            if breaker is not None:
                breaker.record_success()
            assert conn is not None
            self._out[key] = conn
            return conn

    async def send(
        self, peer: NodeId, msg: Message, payload: bytes = b"", *, channel: str = "data"
    ) -> None:
        await (await self.connection(peer, channel)).send(msg, payload)

    async def request(
        self,
        peer: NodeId,
        msg: Message,
        payload: bytes = b"",
        *,
        timeout: float,
        channel: str = "data",
    ) -> Envelope:
        conn = await self.connection(peer, channel)
        return await conn.request(msg, payload, timeout=timeout)

    async def ask(
        self,
        peer: NodeId,
        msg: Ask[R],
        payload: bytes = b"",
        *,
        timeout: float,
        channel: str = "data",
    ) -> tuple[R, bytes]:
        env = await self.request(peer, as_message(msg), payload, timeout=timeout, channel=channel)
        return answer_to(msg, env.msg, peer), env.payload

    async def broadcast(
        self, msg: Message, payload: bytes = b"", *, channel: str = "control"
    ) -> None:
        """Best effort to every other member; an unreachable peer does not stop the rest."""
        others = [p for p in self.peers if p != self.identity.node]
        results = await asyncio.gather(
            *(self.send(p, msg, payload, channel=channel) for p in others), return_exceptions=True
        )
        for peer, r in zip(others, results, strict=True):
            if isinstance(r, Exception):
                log.debug("broadcast of %s to node %s failed: %s", msg.kind, peer, r)
