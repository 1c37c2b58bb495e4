"""A connection owns its socket: framed reads in one task, correlated requests, close.

Modelled on aiokafka's `conn.py`: every request gets a correlation id and a future; the
single reader task resolves replies and hands everything else to the handler; `close`
fails every pending request with a typed, retriable error so callers can re-route.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

from butterfly.metrics.events import (
    BytesTransferred,
    Emit,
    MessageDropped,
    MessageReceived,
    MessageSent,
)
from butterfly.net.framing import LENGTH, Envelope, decode_frame, encode_frame
from butterfly.types.errors import ConnectionFailed, SendTimeout, WireFormatError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.frames import Message

log = logging.getLogger(__name__)

Reply = tuple[Message, bytes]
# Wait for the socket only once this much is buffered: a frame is written whole by one
# `write` (frames never interleave), and awaiting `drain` on every small frame cost a
# coroutine round per frame for nothing while the buffer is empty.
DRAIN_ABOVE = 256 * 1024
Handler = Callable[[NodeId, Envelope], Awaitable[Reply | None]]
"""Serves one incoming frame, given the peer the connection authenticated (its handshake
named it; never the sender the frame claims) and the frame."""


class Connection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: NodeId,
        node: NodeId,
        cluster_id: str,
        epoch: Callable[[], Epoch],
        handler: Handler,
        emit: Emit,
        max_frame: int,
        compression: str = "",
        compression_min_bytes: int = 0,
        send_timeout_s: float = 1.0,
    ) -> None:
        self.peer, self.node, self.cluster_id = peer, node, cluster_id
        self._reader, self._writer = reader, writer
        self._epoch, self._handler, self._emit = epoch, handler, emit
        self._max_frame, self._compression = max_frame, compression
        self._compress_from, self._send_timeout = compression_min_bytes, send_timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Envelope]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.close_reason = ""

    async def send(
        self, msg: Message, payload: bytes = b"", *, corr_id: int = 0, reply: bool = False
    ) -> None:
        if self.closed:
            raise ConnectionFailed(f"connection to node {self.peer} is closed: {self.close_reason}")
        env = Envelope(msg, self.node, self._epoch(), self.cluster_id, corr_id, reply, payload)
        small = len(payload) < self._compress_from
        frame = encode_frame(env, "" if small else self._compression)
        try:
            if self._writer.is_closing():
                raise ConnectionResetError("the socket is closing")
            self._writer.write(frame)
            if self._writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                async with asyncio.timeout(self._send_timeout):
                    await self._writer.drain()
        except TimeoutError:
            self.close(f"the peer took no data for {self._send_timeout:.1f} s")
            raise SendTimeout(
                f"node {self.peer} took no data for {self._send_timeout:.1f} s "
                "(network.send_timeout_ms); connection closed"
            ) from None
        except (ConnectionError, OSError) as e:
            self.close(f"write failed: {e}")
            raise ConnectionFailed(f"sending to node {self.peer} failed: {e}") from e
        self._emit(MessageSent(kind=msg.kind, size_bytes=len(frame)))
        if payload:
            self._emit(BytesTransferred(len(payload), self.peer))

    async def request(self, msg: Message, payload: bytes = b"", *, timeout: float) -> Envelope:
        corr = next(self._ids)
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        try:
            await self.send(msg, payload, corr_id=corr)
            async with asyncio.timeout(timeout):  # wait_for can lose a cancel on 3.11
                return await fut
        except TimeoutError as e:
            raise SendTimeout(
                f"node {self.peer} did not answer {msg.kind} within {timeout:.1f} s"
            ) from e
        finally:
            self._pending.pop(corr, None)

    async def read_frame(self, limit: int = 0) -> Envelope:
        """One frame, with the size limit checked before the body is read. `limit`
        lowers it (the handshake's frames: net.handshake.MAX_HANDSHAKE_FRAME)."""
        limit = min(limit, self._max_frame) if limit else self._max_frame
        (length,) = LENGTH.unpack(await self._reader.readexactly(LENGTH.size))
        if length > limit:
            raise WireFormatError(f"frame of {length} bytes exceeds the limit of {limit}")
        return decode_frame(await self._reader.readexactly(length), limit)

    async def run(self) -> None:
        """Read until the peer goes away or misbehaves; the caller owns this task."""
        try:
            while True:
                env = await self.read_frame()
                self._emit(MessageReceived(kind=env.msg.kind, size_bytes=len(env.payload)))
                if env.payload:
                    self._emit(BytesTransferred(len(env.payload), self.peer))
                if env.reply:
                    if env.sender != self.peer:  # attributed to the proven peer, or dropped
                        self._emit(MessageDropped(reason="sender_mismatch"))
                        continue
                    fut = self._pending.get(env.corr_id)
                    if fut is not None and not fut.done():
                        fut.set_result(env)
                    continue
                task = asyncio.create_task(self._handle(env))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except WireFormatError as e:
            self._emit(MessageDropped(reason="malformed"))
            log.warning("dropping connection from node %s: %s", self.peer, e)
            self.close(f"malformed frame: {e}")
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self.close(f"peer closed the connection ({type(e).__name__})")
        finally:
            self.close(self.close_reason or "reader stopped")

    async def _handle(self, env: Envelope) -> None:
        try:
            reply = await self._handler(self.peer, env)
            if reply is not None and env.corr_id:
                await self.send(reply[0], reply[1], corr_id=env.corr_id, reply=True)
        except ConnectionFailed:
            pass
        except Exception:
            log.exception("handler failed on %s from node %s", env.msg.kind, env.sender)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed, self.close_reason = True, reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionFailed(f"connection to node {self.peer}: {reason}"))
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
