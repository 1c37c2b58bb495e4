"""The frame schema (types.wire data + control): every kind round-trips through a frame,
anything malformed is WireFormatError, and every request names a registered reply."""

from __future__ import annotations

import typing

import msgpack
import pytest

from butterfly.net.framing import LENGTH, Envelope, answer_to, decode_frame, encode_frame
from butterfly.types.errors import InvalidMessage, WireFormatError
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.wire.base import PROTOCOL_VERSION, Ask, reply_type
from butterfly.types.wire.control import (
    AgreementFrame,
    ConfigLocal,
    ConfigPrepare,
    ConfigStatus,
    ConfigStatusQuery,
    ConfigSync,
    ConfigVote,
    Heartbeat,
    Hello,
    HelloAck,
    PlanAck,
    PlanAssign,
    StatusQuery,
    StatusReply,
)
from butterfly.types.wire.data import (
    AuditReply,
    AuditRequest,
    CacheLengths,
    CacheQuery,
    Chunk,
    InputsHeld,
    InputsQuery,
    KvAppend,
    Ping,
    Pong,
    Release,
    StageStep,
    StepError,
    StepResult,
)
from butterfly.types.wire.frames import MESSAGE_TYPES, Message
from butterfly.types.wire.standby import (
    TaskCheckpoint,
    TaskCopied,
    TaskCopy,
    TaskSettled,
    TaskSync,
    TaskSyncReply,
)

R1, R2 = RequestId("a" * 32), RequestId("b" * 32)
N1, N2 = NodeId(1), NodeId(2)

SAMPLES: list[Message] = [
    Hello(N1, "cluster", "f" * 64, "data"),
    HelloAck(N2, False, "model hash differs"),
    Heartbeat(N1, Epoch(3), 17, 12.5, (0, 4), 2),
    StageStep((R1, R2), (3, 0), (7, 0), (1, 5), (N2,), NodeId(0), True, (b"p" * 200,)),
    StepResult((R1,), (3,), N2, (b"p",)),
    StepError((R1,), (3,), N2, "stage_lost", "x" * 1000, True),
    AuditRequest(R1, StageIndex(1), 2, 4, 9),
    AuditReply(R1, N2, ""),
    Release((R1, R2)),
    KvAppend(R1, 0, 2, 32),
    CacheQuery((R1,)),
    CacheLengths((R1,), (40,)),
    Ping(5),
    Pong(5, 1024),
    PlanAssign(Epoch(2), (0, 0, 2, 1, 2, 4), "f" * 64, (2, 0, 2)),
    PlanAck(Epoch(2), N1, True, ""),
    StatusQuery(),
    StatusReply(N1, Epoch(2), (0, 2), 1, 1 << 20, 1e9, 1 << 30, (N2,), (0.2,), (1e8,), 0.01),
    AgreementFrame(),
    ConfigPrepare("d" * 64),
    ConfigVote(N1, "d" * 64, True, "", 4, b"s" * 64),
    ConfigStatusQuery(True),
    ConfigStatus(N1, 3, "h" * 64, "c" * 64, 4, "", 0),
    ConfigSync(),
    ConfigLocal(),
    Chunk(1, 0, 1 << 20, False),
    TaskCopy(R1),
    TaskCopied(N2, R1, True),
    TaskCheckpoint(R1, (5, 6, 7), Epoch(3)),
    TaskCheckpoint(R1, (), Epoch(3), attempt=2),
    TaskSettled(R1, "completed", "", ""),
    TaskSync(),
    TaskSyncReply(N2, 3),
    InputsQuery(R1, Epoch(2), (0, 3, 4)),
    InputsHeld(R1, N2, (0, 3), (5, 1)),
]


def frame(msg: Message, **header: object) -> bytes:
    """A frame's bytes after the length prefix, with header fields overridden."""
    data = encode_frame(Envelope(msg, N1, Epoch(2), "cluster", 5))[LENGTH.size :]
    if not header:
        return data
    hlen = int.from_bytes(data[:2], "big")
    raw = msgpack.unpackb(data[2 : 2 + hlen])
    raw.update(header)
    packed = msgpack.packb(raw)
    return len(packed).to_bytes(2, "big") + packed + data[2 + hlen :]


def test_every_frame_kind_has_a_sample_and_round_trips() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())
    assert len(MESSAGE_TYPES) == len(typing.get_args(Message)) == 34
    for msg in SAMPLES:
        env = decode_frame(frame(msg), 1 << 20)
        assert env.msg == msg and type(env.msg) is type(msg)
        assert (env.sender, env.epoch, env.version) == (N1, 2, PROTOCOL_VERSION)


def body(msg: Message) -> dict[str, object]:
    data = frame(msg)
    hlen = int.from_bytes(data[:2], "big")
    raw = msgpack.unpackb(data[2 : 2 + hlen])
    assert isinstance(raw["b"], dict)
    return raw["b"]


STEP = SAMPLES[3]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"reply_to": -1}, r"stage_step.reply_to must be in \[0, 2\*\*63\)"),
        ({"reply_to": True}, "stage_step.reply_to must be a non-negative integer"),
        ({"last_only": 1}, "stage_step.last_only must be a boolean"),
        ({"route": [1, "2"]}, r"stage_step.route\[1\] must be a non-negative integer"),
        ({"route": 5}, "stage_step.route must be an array"),
        ({"request_ids": ["x" * 300]}, r"request_ids\[0\] is 300 characters"),
        ({"steps": [0] * 5000}, "steps has 5000 items, the limit is 4096"),
        ({"extra": 1}, r"unknown fields \['extra'\]"),
        ({"proofs": [b"p", "p"]}, r"proofs\[1\] must be bytes, got str"),
    ],
)
def test_malformed_bodies_are_refused_with_the_path(
    change: dict[str, object], expected: str
) -> None:
    b = body(STEP)
    b.update(change)
    with pytest.raises(WireFormatError, match=expected):
        decode_frame(frame(STEP, b=b), 1 << 30)


def test_missing_fields_and_non_finite_floats_are_refused() -> None:
    b = body(STEP)
    del b["route"]
    with pytest.raises(WireFormatError, match=r"missing fields \['route'\]"):
        decode_frame(frame(STEP, b=b), 1 << 20)
    status = body(SAMPLES[17])
    status["compute_flops"] = float("inf")
    with pytest.raises(WireFormatError, match="compute_flops must be a finite number"):
        decode_frame(frame(SAMPLES[17], b=status), 1 << 20)
    error = body(SAMPLES[5])
    error["message"] = "x" * 5000  # free text is bounded too
    with pytest.raises(WireFormatError, match="message is 5000 characters, the limit is 4096"):
        decode_frame(frame(SAMPLES[5], b=error), 1 << 20)


def test_every_request_declares_a_registered_reply() -> None:
    asks = {cls for cls in MESSAGE_TYPES.values() if issubclass(cls, Ask)}
    assert {c.kind for c in asks} == {
        "hello",
        "audit_request",
        "inputs_query",
        "cache_query",
        "ping",
        "plan_assign",
        "status_query",
        "config_prepare",
        "config_status_query",
        "config_sync",
        "config_local",
        "task_copy",
        "task_settled",  # asked for a cancel's end (sent one-way for the others)
        "task_sync",
    }
    assert reply_type(CacheQuery((R1,))) is CacheLengths
    assert reply_type(ConfigSync()) is ConfigStatus
    for msg in SAMPLES:
        if isinstance(msg, Ask):
            assert reply_type(msg) in MESSAGE_TYPES.values()


def test_a_reply_of_another_kind_is_invalid_and_blames_the_peer() -> None:
    lengths = answer_to(CacheQuery((R1,)), CacheLengths((R1,), (3,)), N2)
    assert lengths.lengths == (3,)
    with pytest.raises(InvalidMessage, match="answered cache_query with pong") as info:
        answer_to(CacheQuery((R1,)), Pong(1, 0), N2)
    assert info.value.blame == N2
