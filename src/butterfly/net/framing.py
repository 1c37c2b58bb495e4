"""One frame on the wire: length, envelope header, optional tensor payload.

    [u32 rest length][u16 header length][msgpack header][payload]
    header = {"v": version, "c": cluster id, "e": epoch, "s": sender, "id": correlation id,
              "r": is reply, "k": kind, "b": body, "z": payload compression ("" or "lz4")}

The length is checked against the frame limit before a byte of the frame is read, and
the header is decoded with msgpack only (never pickle), then validated field by field.

A message whose frame would exceed the frame limit (a long prompt's activations, a KV
copy, an audit reply of a long generation) travels as `Chunk` frames: its encoded frame
cut into pieces that each fit, with a stream number, an index, the total size and a final
flag. The total is declared by the first piece and checked against the message limit
(network.max_message_bytes) before anything is buffered, and the buffer only grows as
bytes arrive; one message up to the frame limit is still exactly one frame. A stream must
also end in time (`Reassembly.deadline`): a peer that starts one and stalls holds at most
one message's buffer, and only until then.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import lz4.frame
import msgpack
import msgspec

from butterfly.types.errors import InvalidMessage, MessageTooLarge, WireFormatError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.base import PROTOCOL_VERSION, Ask, reply_type
from butterfly.types.wire.data import Chunk
from butterfly.types.wire.frames import Message, from_body_bytes, to_body
from butterfly.types.wire.mirror import DECODE_ERRORS

R = TypeVar("R")

LENGTH = struct.Struct(">I")
HEADER_LENGTH = struct.Struct(">H")
MAX_HEADER = 64 * 1024
COMPRESSIONS = ("", "lz4")
MAX_LZ4_RATIO = 16
"""The most an lz4 payload may inflate, times its compressed size. A receiver inflated
one up to the whole frame limit whatever its size: 16 MiB of zeros travel as 64 KiB, so
a peer made a node hold 250 times what it sent (a review). Tensors compress far less
(bf16 activations by a few percent); a payload that would compress more is sent raw
(`_compressed`), so no honest frame is refused for it."""
CHUNK_OVERHEAD = 512
"""Bytes of a chunk frame that are not the piece: the length prefixes and its header
(the envelope fields, a cluster id of at most 64 characters, four small integers) take
under 200; the rest is margin."""


@dataclass(frozen=True, slots=True)
class Envelope:
    msg: Message
    sender: NodeId  # as the peer claims it: transports attribute frames to the connection
    epoch: Epoch
    cluster_id: str
    corr_id: int = 0  # non-zero: a request expecting a reply, or that reply
    reply: bool = False
    payload: bytes = b""
    version: int = PROTOCOL_VERSION


def encode_frame(env: Envelope, compression: str = "") -> bytes:
    payload, compression = _compressed(env.payload, compression)
    header = _encode(
        {
            "v": env.version,
            "c": env.cluster_id,
            "e": env.epoch,
            "s": env.sender,
            "id": env.corr_id,
            "r": env.reply,
            "k": env.msg.kind,
            "b": to_body(env.msg),
            "z": compression,
        }
    )
    if len(header) > MAX_HEADER:
        raise WireFormatError(f"{env.msg.kind} header of {len(header)} bytes is over {MAX_HEADER}")
    rest = HEADER_LENGTH.size + len(header) + len(payload)
    return b"".join((LENGTH.pack(rest), HEADER_LENGTH.pack(len(header)), header, payload))


def _compressed(payload: bytes, compression: str) -> tuple[bytes, str]:
    """`payload` as sent, and its compression: raw when asked or when it would inflate
    past `MAX_LZ4_RATIO`, which the receiver refuses."""
    if compression != "lz4" or not payload:
        return payload, ""
    packed = lz4.frame.compress(payload, compression_level=0)
    if len(packed) * MAX_LZ4_RATIO < len(payload):
        return payload, ""
    return packed, compression


_HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "v": int,
    "c": str,
    "e": int,
    "s": int,
    "id": int,
    "r": bool,
    "k": str,
    "b": dict,
    "z": str,
}


class _Header(msgspec.Struct, forbid_unknown_fields=True):
    """The envelope as `_HEADER_TYPES` checks it, decoded and checked in C; the body
    stays msgpack until its kind's own decoder (types.wire.mirror) reads it."""

    v: int
    c: str
    e: Epoch
    s: NodeId
    id: int
    r: bool
    k: str
    b: msgspec.Raw
    z: str


_decode_header = msgspec.msgpack.Decoder(_Header).decode
_encode = msgspec.msgpack.Encoder().encode


def _header(data: bytes) -> _Header:
    """The frame's envelope fields, or WireFormatError naming what is wrong with them.
    A header the C decoder refuses is checked again field by field for the error."""
    try:
        return _decode_header(data)
    except DECODE_ERRORS:
        pass
    except RecursionError:  # msgspec walks nested values up to Python's recursion limit
        raise WireFormatError("frame header nests too deeply") from None
    try:
        header = msgpack.unpackb(data)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireFormatError(f"frame header is not valid msgpack: {e}") from e
    if not isinstance(header, dict) or set(header) != set(_HEADER_TYPES):
        raise WireFormatError("frame header lacks or adds envelope fields")
    for key, t in _HEADER_TYPES.items():
        if not isinstance(header[key], t) or (t is int and isinstance(header[key], bool)):
            raise WireFormatError(f"envelope field {key!r} has the wrong type")
    # the checks take what msgspec refused: build it from what they took
    try:
        header["b"] = msgspec.Raw(msgpack.packb(header["b"]))
    except (ValueError, TypeError, OverflowError) as e:
        raise WireFormatError(f"frame body cannot be read: {e}") from e
    return _Header(**header)


def decode_frame(rest: bytes, max_payload: int) -> Envelope:
    """Decode everything after the length prefix; raise WireFormatError on any defect."""
    if len(rest) < HEADER_LENGTH.size:
        raise WireFormatError("frame is too short for its header length")
    (hlen,) = HEADER_LENGTH.unpack_from(rest)
    if HEADER_LENGTH.size + hlen > len(rest):
        raise WireFormatError(f"header length {hlen} runs past the {len(rest)}-byte frame")
    header = _header(rest[HEADER_LENGTH.size : HEADER_LENGTH.size + hlen])
    if header.z not in COMPRESSIONS:
        raise WireFormatError(f"unknown payload compression {header.z!r}")
    payload = rest[HEADER_LENGTH.size + hlen :]
    if header.z == "lz4" and payload:
        payload = _inflated(payload, max_payload)
    return Envelope(
        msg=from_body_bytes(header.k, header.b),
        sender=header.s,
        epoch=header.e,
        cluster_id=header.c,
        corr_id=header.id,
        reply=header.r,
        payload=bytes(payload),
        version=header.v,
    )


def _inflated(packed: bytes, max_payload: int) -> bytes:
    """An lz4 payload inflated, or WireFormatError once it grows past `max_payload` or
    `MAX_LZ4_RATIO` times its compressed size (no sender compresses more)."""
    bound = min(max_payload, len(packed) * MAX_LZ4_RATIO)
    try:
        with lz4.frame.LZ4FrameDecompressor() as d:
            payload = d.decompress(packed, max_length=bound)
            if d.eof:
                return cast(bytes, payload)
    except RuntimeError as e:
        raise WireFormatError(f"lz4 payload is corrupt: {e}") from e
    if bound == max_payload:
        raise WireFormatError(f"decompressed payload exceeds {max_payload} bytes")
    raise WireFormatError(
        f"lz4 payload of {len(packed)} bytes inflates past {MAX_LZ4_RATIO} times that "
        "(a sender sends so compressible a payload raw)"
    )


def as_message(request: Ask[Any]) -> Message:
    """A request as the frame union: every `Ask` subclass is a frame message (types.wire)."""
    return cast(Message, request)


def answer_to(request: Ask[R], reply: Message, peer: NodeId) -> R:
    """`reply` as the answer `request` declared, or InvalidMessage blaming `peer` (the
    authenticated peer asked, not whoever the frame claims): checked here once, so no
    caller inspects a reply's type."""
    expected = reply_type(request)
    if type(reply) is not expected:
        raise InvalidMessage(
            f"node {peer} answered {as_message(request).kind} with {reply.kind}, "
            f"not {getattr(expected, 'kind', expected.__name__)}",
            blame=peer,
        )
    return cast(R, reply)


def chunk_frames(
    env: Envelope, frame: bytes, *, stream: int, max_frame: int, max_message: int
) -> list[bytes]:
    """`frame` (the encoding of `env`, too large for one frame) as chunk frames, each at
    most `max_frame` bytes after its length prefix. Raises MessageTooLarge, naming the
    limit, when the message is over `max_message`: the peer would refuse it, so it is
    never sent."""
    whole = memoryview(frame)[LENGTH.size :]
    total = len(whole)
    if total > max_message:
        raise MessageTooLarge(
            f"{env.msg.kind} of {total} bytes exceeds network.max_message_bytes "
            f"({max_message}); raise it on every node or send less"
        )
    piece = max_frame - CHUNK_OVERHEAD
    if piece < 1:
        raise WireFormatError(f"frame limit {max_frame} leaves no room for a chunk")
    out: list[bytes] = []
    for index, at in enumerate(range(0, total, piece)):
        part = bytes(whole[at : at + piece])
        final = at + piece >= total
        chunk = Chunk(stream, index, total, final)
        env_c = Envelope(chunk, env.sender, env.epoch, env.cluster_id, 0, False, part)
        out.append(encode_frame(env_c))
    return out


CHUNK_STALL_S = 30.0
"""Slack every chunked message gets beyond its transfer at `CHUNK_MIN_RATE`."""
CHUNK_MIN_RATE = float(1 << 20)
"""Bytes per second below which a chunked message counts as stalled: a link that slow
cannot serve a step in any step timeout anyway, and a hostile peer trickling bytes holds
its buffer for at most the time an honest one would take at this rate."""


class Reassembly:
    """The chunked message a connection is receiving, at most one at a time: a sender
    writes one chunked message per connection at a time (other frames may come between
    its chunks). Any departure from that is the sender's fault, raised as
    WireFormatError (MessageTooLarge for a declared size over the limit).

    A stream that began at `t` must be complete by `t + stall_s + total / min_rate`
    (`deadline`, on `clock`: the connection's reads time out on the same clock); the
    connection drops it (`drop`) when it is not."""

    def __init__(
        self,
        max_message: int,
        *,
        stall_s: float = CHUNK_STALL_S,
        min_rate: float = CHUNK_MIN_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_message = max_message
        self._stall_s, self._min_rate, self._clock = stall_s, min_rate, clock
        self.deadline: float | None = None  # when the stream being received must be whole
        self._stream: int | None = None
        self._parts: list[bytes] = []
        self._received = 0
        self._total = 0
        self._next = 0

    @property
    def buffered(self) -> int:
        return self._received

    def add(self, chunk: Chunk, piece: bytes) -> bytes | None:
        """Take one chunk; the whole encoded message (what follows a frame's length
        prefix) once its final chunk is in, else None."""
        if self._stream is None:
            if chunk.index != 0:
                raise WireFormatError(f"chunk {chunk.index} of stream {chunk.stream} has no start")
            if chunk.total > self.max_message:
                raise MessageTooLarge(
                    f"a chunked message of {chunk.total} bytes exceeds "
                    f"network.max_message_bytes ({self.max_message})"
                )
            self._stream, self._total = chunk.stream, chunk.total
            self.deadline = self._clock() + self._stall_s + chunk.total / self._min_rate
        elif (chunk.stream, chunk.index, chunk.total) != (self._stream, self._next, self._total):
            raise WireFormatError(
                f"chunk {chunk.index} of stream {chunk.stream} arrived while stream "
                f"{self._stream} waits for chunk {self._next}"
            )
        self._received += len(piece)
        if not piece or self._received > self._total:
            raise WireFormatError(
                f"chunk stream {chunk.stream} overruns its declared {self._total} bytes"
            )
        complete = self._received == self._total
        if chunk.final != complete:
            raise WireFormatError(
                f"chunk stream {chunk.stream}: final flag {chunk.final} at "
                f"{self._received} of {self._total} bytes"
            )
        self._parts.append(piece)
        self._next += 1
        if not complete:
            return None
        whole = b"".join(self._parts)
        self.drop()
        return whole

    def drop(self) -> int:
        """Forget the stream under way (if any); the bytes it held."""
        held = self._received
        self._stream, self._parts, self._received, self._total, self._next = None, [], 0, 0, 0
        self.deadline = None
        return held
