"""The in-memory transport: N nodes in one process, for component tests.

Frames go through the same encoder and decoder as on TCP, chunked above the frame limit
as on TCP, so a message that would not survive the wire does not survive here either.
Delivery is asynchronous (a task per frame), like a network: a sender never runs the
receiver's handler on its own stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from butterfly.metrics.events import Emit, MessageDropped
from butterfly.net.conn import Handler
from butterfly.net.framing import (
    LENGTH,
    Envelope,
    Reassembly,
    answer_to,
    as_message,
    chunk_frames,
    decode_frame,
    encode_frame,
)
from butterfly.types.errors import ConnectionFailed, SendTimeout, WireFormatError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.base import Ask
from butterfly.types.wire.data import Chunk
from butterfly.types.wire.frames import Message

log = logging.getLogger(__name__)
R = TypeVar("R")
FIRST_EPOCH = Epoch(0)


@dataclass
class MemoryNetwork:
    """The shared medium; `down` nodes neither send nor receive (a send fails at once, as
    to a closed port); what goes to or from a `blackholed` node is lost on the way (an
    ask times out, as through a firewall that drops a connection's packets)."""

    cluster_id: str = "test"
    nodes: dict[NodeId, MemoryTransport] = field(default_factory=dict)
    down: set[NodeId] = field(default_factory=set)
    blackholed: set[NodeId] = field(default_factory=set)
    max_frame_bytes: int = 256 * 2**20  # network.max_frame_bytes: larger ones are chunked
    max_message_bytes: int = 2**30  # network.max_message_bytes

    def transport(
        self, node: NodeId, emit: Emit, epoch: Callable[[], Epoch] = lambda: FIRST_EPOCH
    ) -> MemoryTransport:
        """`epoch`: the epoch stamped on every frame this node sends, as on TCP."""
        t = MemoryTransport(self, node, emit, epoch)
        self.nodes[node] = t
        return t


class MemoryTransport:
    def __init__(
        self, net: MemoryNetwork, node: NodeId, emit: Emit, epoch: Callable[[], Epoch]
    ) -> None:
        self.net, self.node, self._emit = net, node, emit
        self._handler: Handler | None = None
        self._epoch = epoch
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Envelope]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.peers = net.nodes
        # the members as this node knows them (`set_peers`), as a TCP handshake checks
        # them; None: every node of the network (the transport alone, in unit tests)
        self.members: set[NodeId] | None = None

    def set_peers(self, peers: Mapping[NodeId, str]) -> None:
        """A removed member is unreachable from now on and its frames are dropped, as its
        refused handshake would on TCP."""
        self.members = {*peers, self.node}

    async def start(self, handler: Handler) -> None:
        self._handler = handler

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.net.nodes.pop(self.node, None)

    def _deliver(self, peer: NodeId, env: Envelope) -> None:
        target = self.net.nodes.get(peer)
        if target is None or peer in self.net.down or self.node in self.net.down:
            raise ConnectionFailed(f"node {peer} is unreachable")
        if self.members is not None and peer not in self.members:
            raise ConnectionFailed(f"node {peer} is not a member of this cluster", blame=peer)
        if peer in self.net.blackholed or self.node in self.net.blackholed:
            return
        received = self._wire(env)
        task = asyncio.create_task(target._receive(self.node, received))
        target._tasks.add(task)
        task.add_done_callback(target._tasks.discard)

    def _wire(self, env: Envelope) -> Envelope:
        """`env` as the peer would read it off a socket: one frame, or its chunks put
        back together."""
        net = self.net
        frame = encode_frame(env)
        if len(frame) - LENGTH.size <= net.max_frame_bytes:
            return decode_frame(frame[LENGTH.size :], net.max_frame_bytes)
        chunks = chunk_frames(
            env,
            frame,
            stream=next(self._ids),
            max_frame=net.max_frame_bytes,
            max_message=net.max_message_bytes,
        )
        whole, reassembly = None, Reassembly(net.max_message_bytes)
        for piece in chunks:
            chunk = decode_frame(piece[LENGTH.size :], net.max_frame_bytes)
            assert isinstance(chunk.msg, Chunk)  # chunk_frames made it
            whole = reassembly.add(chunk.msg, chunk.payload)
        if whole is None:
            raise WireFormatError(f"{env.msg.kind}: chunks ended before the message")
        return decode_frame(whole, net.max_message_bytes)

    async def _receive(self, peer: NodeId, env: Envelope) -> None:
        """`peer`: the sending transport's node, what a TCP handshake would have named."""
        if self.members is not None and peer not in self.members:
            self._emit(MessageDropped(reason="handshake_refused"))
            return
        if env.reply:
            fut = self._pending.get(env.corr_id)
            if fut is not None and not fut.done():
                fut.set_result(env)
            return
        if self._handler is None:
            return
        try:
            reply = await self._handler(peer, env)
        except Exception:
            log.exception("handler failed on %s", env.msg.kind)
            return
        if reply is not None and env.corr_id:
            back = Envelope(
                reply[0], self.node, self._epoch(), self.net.cluster_id, env.corr_id, True, reply[1]
            )
            with contextlib.suppress(ConnectionFailed):
                self._deliver(peer, back)

    async def send(
        self, peer: NodeId, msg: Message, payload: bytes = b"", *, channel: str = "data"
    ) -> None:
        self._deliver(
            peer, Envelope(msg, self.node, self._epoch(), self.net.cluster_id, 0, False, payload)
        )

    async def request(
        self,
        peer: NodeId,
        msg: Message,
        payload: bytes = b"",
        *,
        timeout: float,
        channel: str = "data",
    ) -> Envelope:
        corr = next(self._ids)
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        try:
            self._deliver(
                peer,
                Envelope(msg, self.node, self._epoch(), self.net.cluster_id, corr, False, payload),
            )
            async with asyncio.timeout(timeout):  # wait_for can lose a cancel on 3.11
                return await fut
        except TimeoutError as e:
            raise SendTimeout(f"node {peer} did not answer {msg.kind} within {timeout} s") from e
        finally:
            self._pending.pop(corr, None)

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
        for peer in list(self.net.nodes):
            if peer != self.node:
                try:
                    await self.send(peer, msg, payload)
                except ConnectionFailed:
                    continue
