"""The agreement wire format (types.wire.agreement): every message round-trips, anything
malformed is InvalidMessage."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import ClassVar

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from butterfly.protocol.sign import SigningKey, sign_message, verify_bytes, verify_message
from butterfly.types.errors import InvalidMessage
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import (
    KINDS,
    CheckpointVote,
    Dispatch,
    Evidence,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    Request,
    StateSnapshot,
    StateTransfer,
    Veto,
    ViewChange,
    decode,
    encode,
    request_digest,
    signing_bytes,
)
from butterfly.types.wire.checks import MAX_MESSAGE_BYTES
from butterfly.types.wire.codec import Codec
from butterfly.types.wire.control import Heartbeat
from tests.protocol_util import KEYS, request

D = bytes(range(32))


def samples() -> list[object]:
    req = request(3, b"payload")
    pp = sign_message(PrePrepare(NodeId(0), Epoch(2), 1, 7, request_digest(req), req), KEYS[0])
    prep = sign_message(Prepare(NodeId(1), Epoch(2), 1, 7, pp.digest, pp.signature), KEYS[1])
    vote = sign_message(CheckpointVote(NodeId(1), Epoch(2), 8, D), KEYS[1])
    vc = sign_message(
        ViewChange(
            NodeId(1),
            Epoch(2),
            view=2,
            stable_seq=8,
            stable_digest=D,
            stable_proof=(vote,),
            prepared=(PreparedCertificate(pp, (prep,)),),
            pre_prepared=(pp.header(),),
        ),
        KEYS[1],
    )
    return [
        req,
        pp,
        prep,
        sign_message(Veto(NodeId(2), Epoch(2), 1, 7, pp.digest), KEYS[2]),
        vote,
        vc,
        sign_message(NewView(NodeId(2), Epoch(2), 2, (vc,), (pp,)), KEYS[2]),
        sign_message(StateTransfer(NodeId(3), Epoch(2), 8, D, (vote,), (pp,)), KEYS[3]),
        sign_message(StateSnapshot(NodeId(2), Epoch(2), 8, D, (vote,), b"executed"), KEYS[2]),
        sign_message(Evidence(NodeId(3), Epoch(2), NodeId(0), pp.header(), pp.header()), KEYS[3]),
        sign_message(Heartbeat(NodeId(1), Epoch(2), seq=5), KEYS[1]),
        sign_message(
            Dispatch(
                NodeId(0), Epoch(2), 7, ("r",), (3,), (9,), (1,), (NodeId(1),), NodeId(0), True
            ),
            KEYS[0],
        ),
    ]


@pytest.mark.parametrize("message", samples(), ids=lambda m: type(m).__name__)
def test_round_trip_and_signature(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    back = decode(data)
    assert back == message
    sender = back.sender
    key = KEYS[sender] if sender < len(KEYS) else None
    if key is not None and back.kind != "request":
        assert verify_message(back, key.public)


def test_every_kind_is_registered_once() -> None:
    assert len(KINDS) == 16 and all(cls.kind == kind for kind, cls in KINDS.items())


def _raw(message: object) -> dict[str, object]:
    raw = msgpack.unpackb(encode(message))  # type: ignore[arg-type]
    assert isinstance(raw, dict)
    return raw


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.update(kind="launch_missiles"), "unknown message kind"),
        (lambda r: r.update(seq="7"), "seq must be a non-negative integer"),
        (lambda r: r.update(seq=True), "seq must be a non-negative integer"),
        (lambda r: r.update(seq=-1), "must be in [0, 2**63)"),
        (lambda r: r.update(digest=b"short"), "digest is 5 bytes, expected 32..32"),
        (lambda r: r.update(extra=1), "unknown fields ['extra']"),
        (lambda r: r.pop("view"), "missing fields ['view']"),
        (lambda r: r.update(version=1), "speaks protocol version 1"),
        (lambda r: r["request"].update(kind="prepare"), "must be one of ['request']"),
        (lambda r: r["request"].update(operation="text"), "operation must be bytes"),
    ],
)
def test_malformed_fields_are_rejected_with_the_path(mutate: object, expected: str) -> None:
    raw = _raw(samples()[1])
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(InvalidMessage) as info:
        decode(msgpack.packb(raw))
    assert expected in str(info.value)


def test_garbage_oversized_and_non_maps_are_rejected() -> None:
    for data in (b"\xc1", b"", msgpack.packb([1, 2]), msgpack.packb("x")):
        with pytest.raises(InvalidMessage):
            decode(data)
    with pytest.raises(InvalidMessage, match="exceeds the"):
        decode(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(InvalidMessage, match="exceeds the 10-byte limit"):
        decode(encode(samples()[0]), max_bytes=10)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    """A message with a float field (no coordination message has one today)."""

    kind: ClassVar[str] = "reading"
    sender: NodeId
    value: float


def test_non_finite_floats_are_rejected() -> None:
    codec = Codec({Reading.kind: Reading}, version=1, error=InvalidMessage)
    raw = msgpack.unpackb(codec.encode(Reading(NodeId(1), 9.5)))
    assert codec.decode(msgpack.packb(raw)) == Reading(NodeId(1), 9.5)
    raw["value"] = math.nan
    with pytest.raises(InvalidMessage, match="finite"):
        codec.decode(msgpack.packb(raw))


def test_the_request_body_is_outside_the_pre_prepare_signature() -> None:
    pp = samples()[1]
    assert isinstance(pp, PrePrepare)
    assert signing_bytes(pp) == signing_bytes(pp.header())
    assert verify_message(pp.header(), KEYS[0].public)
    assert not verify_message(dataclasses.replace(pp, seq=8), KEYS[0].public)


def test_verification_never_raises_on_bad_keys_or_signatures() -> None:
    assert not verify_bytes(b"\x00" * 31, b"\x00" * 64, b"x")
    assert not verify_bytes(b"\xff" * 32, b"\x00" * 64, b"x")
    assert not verify_bytes(KEYS[0].public, b"\x00" * 63, b"x")
    key = SigningKey.generate()
    assert verify_bytes(key.public, key.sign(b"x"), b"x")


@settings(max_examples=150, deadline=None)
@given(
    timestamp=st.integers(0, 2**63 - 1),
    operation=st.binary(max_size=512),
    epoch=st.integers(0, 2**63 - 1),
)
def test_requests_round_trip_for_any_field_values(
    timestamp: int, operation: bytes, epoch: int
) -> None:
    req = Request(NodeId(100), Epoch(epoch), timestamp, operation)
    assert decode(encode(req)) == req


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_escape_as_anything_but_invalid_message(data: bytes) -> None:
    with contextlib.suppress(InvalidMessage):
        decode(data)
