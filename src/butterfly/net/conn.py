"""A connection owns its socket: framed reads in one task, correlated requests, close.

Modelled on aiokafka's `conn.py`: every request gets a correlation id and a future; the
single reader task resolves replies and hands everything else to the handler; `close`
fails every pending request with a typed, retriable error so callers can re-route.

A message larger than one frame goes out as chunks (net.framing) and is reassembled here
before any handler sees it. A peer that breaks the chunk rules or declares a message over
the limit is disconnected: the connection to that peer is the one closed and the one
counted, so its pending requests fail at once instead of timing out on someone else. So
is a peer whose chunked message stalls past its deadline (`framing.Reassembly`): its
buffer is freed, the drop counted (`chunks_stalled`), and no node is blamed (a stall may
be the link's).

Handlers run as tasks, at most `max_handlers` at a time per connection, holding payloads
of at most one message beyond `max_message` bytes together: with that many running or
that much held, the reader stops reading, the socket's buffers fill and TCP slows the
sender down. A peer flooding frames holds at most that many tasks, that many bytes and
one frame in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

from butterfly.metrics.events import (
    Emit,
    MessageDropped,
    MessageReceived,
    MessageSent,
    PeerError,
)
from butterfly.net.framing import (
    CHUNK_STALL_S,
    LENGTH,
    Envelope,
    Reassembly,
    chunk_frames,
    decode_frame,
    encode_frame,
)
from butterfly.types.errors import (
    ConnectionFailed,
    MessageTooLarge,
    SendTimeout,
    WireFormatError,
)
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.data import Chunk
from butterfly.types.wire.frames import Message

log = logging.getLogger(__name__)

Reply = tuple[Message, bytes]
# Wait for the socket only once this much is buffered: a frame is written whole by one
# `write` (frames never interleave), and awaiting `drain` on every small frame cost a
# coroutine round per frame for nothing while the buffer is empty.
DRAIN_ABOVE = 256 * 1024
COALESCE_BELOW = 64 * 1024
"""Frames shorter than this, sent in one turn of the event loop, leave in one `write`
at its end (`_flush`): under bench/api.py's 16 clients a gateway sent its copies, steps,
releases and ends as 4 writes per request, each a system call that on loopback also runs
the receiver's TCP path, and the standby answered a burst of copies committed together
one write each. Longer frames (prefill activations, KV copies) go out at once, after
what is waiting, so `drain` sees them in the buffer; so do the messages a token waits on
(`LATENCY_BOUND`: steps and their results). Held to the turn's end, a middle stage's
step waited 55 µs for the handler's bookkeeping after its send (py timestamps on a 4-node
tiny cluster, AMD EPYC); written at once, 4 nodes decoded in 0.93x the time (bench/hops.py
A/B, 0.78-1.32 and 0.73-1.19 over 20 and 30 rounds)."""
MAX_HANDLERS = 64
"""Handlers in flight per connection. Steps of one peer are batched (one frame carries a
whole batch) and torch runs one job at a time, so a well-behaved peer rarely has more
than a few in flight; 64 leaves room for a burst of votes, releases and results while a
flooding peer costs at most 64 tasks."""
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
        max_message: int = 0,
        max_handlers: int = MAX_HANDLERS,
        compression: str = "",
        compression_min_bytes: int = 0,
        send_timeout_s: float = 1.0,
        chunk_stall_s: float = CHUNK_STALL_S,
    ) -> None:
        """`max_message`: largest message, chunked beyond `max_frame` (at least that; 0 =
        no message above one frame). `chunk_stall_s`: the slack a chunked message gets
        beyond its transfer at the slowest rate taken (`framing.Reassembly`)."""
        self.peer, self.node, self.cluster_id = peer, node, cluster_id
        self._reader, self._writer = reader, writer
        self._epoch, self._handler, self._emit = epoch, handler, emit
        self._max_frame, self._compression = max_frame, compression
        self._max_message = max(max_message, max_frame)
        self._chunks = Reassembly(self._max_message, stall_s=chunk_stall_s)
        self._streams = itertools.count(1)
        self._chunking = asyncio.Lock()  # one chunked message at a time on this socket
        # a counter and an event, not a semaphore: no coroutine per frame while there is room
        self._max_handlers, self._room = max(1, max_handlers), asyncio.Event()
        self._held = 0  # payload bytes of the frames `_tasks` are handling
        self._compress_from, self._send_timeout = compression_min_bytes, send_timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Envelope]] = {}
        self._tasks: dict[asyncio.Task[None], int] = {}  # each with its payload's size
        self._out: list[bytes] = []  # short frames of this loop turn, in order (`_flush`)
        self._written = 0  # bytes handed to the transport, for `_drain`'s progress
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
            if len(frame) - LENGTH.size <= self._max_frame:
                self._write(frame, getattr(type(msg), "LATENCY_BOUND", False))
                if self._writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                    await self._drain()
            else:
                await self._send_chunked(env, frame)
        except TimeoutError:
            self.close(f"the peer took no data for {self._send_timeout:.1f} s", abort=True)
            raise SendTimeout(
                f"node {self.peer} took no data for {self._send_timeout:.1f} s "
                "(network.send_timeout_ms); connection closed"
            ) from None
        except (ConnectionError, OSError) as e:
            self.close(f"write failed: {e}")
            raise ConnectionFailed(f"sending to node {self.peer} failed: {e}") from e
        self._emit(MessageSent(msg.kind, len(frame), len(payload)))

    def _write(self, frame: bytes, now: bool = False) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("the socket is closing")
        if len(frame) >= COALESCE_BELOW:
            self._flush()  # what waits goes first: frames never reorder
            self._written += len(frame)
            self._writer.write(frame)
            return
        if not self._out and not now:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(frame)
        if now:
            self._flush()  # with what waits, in one write

    def _flush(self) -> None:
        """Write the short frames of this loop turn as one piece. `close` writes them
        first, as the transport would have sent frames written before it; a socket the
        peer or the kernel closed meanwhile drops them, as it would have dropped them
        written one by one."""
        out, self._out = self._out, []
        if out and not self._writer.is_closing():
            data = out[0] if len(out) == 1 else b"".join(out)
            self._written += len(data)
            self._writer.write(data)

    async def _send_chunked(self, env: Envelope, frame: bytes) -> None:
        """Write a message over the frame limit as chunks, draining as the buffer fills,
        so a large message occupies one piece of buffer at a time. Raises
        MessageTooLarge before writing anything when the peer would refuse it."""
        frames = chunk_frames(
            env,
            frame,
            stream=next(self._streams),
            max_frame=self._max_frame,
            max_message=self._max_message,
        )
        async with self._chunking:
            for piece in frames:
                self._write(piece)
                if self._writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                    await self._drain()

    async def _drain(self) -> None:
        """Wait for the socket to take what is buffered, timing out only when the peer
        takes nothing for `send_timeout_s`: a frame larger than the link carries in that
        time still goes out at the link's pace (a peer that stops is reset between one and
        two `send_timeout_s` after its last byte). Whether the peer took some is counted
        from the bytes written minus those still buffered, not from the buffer's size
        alone, which other senders on this connection may grow meanwhile."""
        transport = self._writer.transport
        while True:
            taken = self._written - transport.get_write_buffer_size()
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self._writer.drain()
                return
            except TimeoutError:
                if self._written - transport.get_write_buffer_size() <= taken:
                    raise  # the peer took nothing for a whole send_timeout_s

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
            raise MessageTooLarge(
                f"frame of {length} bytes exceeds the limit of {limit}"
                + (" (network.max_frame_bytes)" if limit == self._max_frame else ""),
                blame=self.peer,
            )
        return decode_frame(await self._reader.readexactly(length), limit)

    async def run(self) -> None:
        """Read until the peer goes away or misbehaves; the caller owns this task.

        Replies are taken without waiting for a handler slot; only frames that need a
        handler wait. Replies to this node's requests come back on the connection it
        opened, whose peer sends it nothing else, so a full set of handlers here never
        holds up the reply one of them waits for."""
        try:
            while True:
                env = await self._next_frame()
                if env is None:
                    return
                if isinstance(env.msg, Chunk):  # a piece of a message over the frame limit
                    whole = self._chunks.add(env.msg, env.payload)
                    if whole is None:
                        continue
                    env = decode_frame(whole, self._max_message)
                self._emit(MessageReceived(env.msg.kind, len(env.payload), len(env.payload)))
                if env.reply:
                    if env.sender != self.peer:  # attributed to the proven peer, or dropped
                        self._emit(MessageDropped(reason="sender_mismatch"))
                        continue
                    fut = self._pending.get(env.corr_id)
                    if fut is not None and not fut.done():
                        fut.set_result(env)
                    continue
                task = asyncio.create_task(self._handle(env))
                self._tasks[task] = len(env.payload)
                self._held += len(env.payload)
                task.add_done_callback(self._handled)
                while self._full():  # backpressure: stop reading
                    self._room.clear()
                    await self._room.wait()
        except MessageTooLarge as e:  # counted against the sender, never the next node
            self._emit(MessageDropped(reason="oversized"))
            self._emit(PeerError(node=self.peer, error=e.kind, retriable=False))
            log.warning("dropping connection from node %s: %s", self.peer, e)
            self.close(f"node {self.peer} sent an oversized message: {e}")
        except WireFormatError as e:
            self._emit(MessageDropped(reason="malformed"))
            log.warning("dropping connection from node %s: %s", self.peer, e)
            self.close(f"malformed frame: {e}")
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self.close(f"peer closed the connection ({type(e).__name__})")
        finally:
            self.close(self.close_reason or "reader stopped")

    async def _next_frame(self) -> Envelope | None:
        """The next frame, or None once a chunked message under way missed its deadline
        (the stream is dropped, counted and the connection closed: a frame cut off
        half-read cannot be resumed)."""
        deadline = self._chunks.deadline
        if deadline is None:
            return await self.read_frame()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await self.read_frame()
        held = self._chunks.drop()
        self._emit(MessageDropped(reason="chunks_stalled"))
        log.warning("node %s stalled a chunked message (%d bytes held); closing", self.peer, held)
        self.close(f"node {self.peer} stalled a chunked message past its deadline")
        return None

    def _full(self) -> bool:
        """Whether the handlers running hold all they may: a payload of a few bytes held
        for a handler's lifetime could be a gigabyte inflated (lz4), or 64 frames at
        the frame limit 16 GiB, per connection (a review)."""
        return len(self._tasks) >= self._max_handlers or self._held >= self._max_message

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._held -= self._tasks.pop(task, 0)
        self._room.set()

    async def _handle(self, env: Envelope) -> None:
        try:
            reply = await self._handler(self.peer, env)
            if reply is not None and env.corr_id:
                await self.send(reply[0], reply[1], corr_id=env.corr_id, reply=True)
        except ConnectionFailed:
            pass
        except MessageTooLarge as e:  # the asker would wait out its timeout and blame us
            log.error("reply to %s from node %s not sent: %s", env.msg.kind, self.peer, e)
            self.close(f"a reply over the message limit: {e}")
        except Exception:
            log.exception("handler failed on %s from node %s", env.msg.kind, env.sender)

    def close(self, reason: str, *, abort: bool = False) -> None:
        """Fail every pending request and close the socket. `abort`: drop what is still
        buffered for the peer and reset the connection at once; a plain close first
        writes the buffer out, which for a peer that takes no data (the send timeout)
        never happens, so its socket stayed open for as long as that peer did."""
        if self.closed:
            return
        self.closed, self.close_reason = True, reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionFailed(f"connection to node {self.peer}: {reason}"))
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            if abort:
                self._out.clear()
                self._writer.transport.abort()
                return
            self._flush()  # what was sent before the close still goes, as when written at once
            self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
