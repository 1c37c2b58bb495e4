"""The C-checked mirror of the wire schema (types.wire.mirror) gives the codec's verdict.

Every frame body is decoded by the mirror first and by the codec's own checks only when
the mirror refuses it. A mirror looser than the codec would let a Byzantine peer's body
through that the schema forbids, so these tests mutate valid bodies of every kind at
random (wrong types, out-of-range integers, non-finite floats, overlong strings and
arrays, missing, extra and misnamed fields, nested records without their kind) and hold
both to one verdict: the same message, or both refuse."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from butterfly.net import framing
from butterfly.net.framing import LENGTH, Envelope, decode_frame, encode_frame
from butterfly.types.errors import ButterflyError, WireFormatError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire import agreement, commands, frames
from butterfly.types.wire.checks import MAX_INT, MAX_ITEMS, MAX_STR
from butterfly.types.wire.codec import Codec
from butterfly.types.wire.mirror import DECODE_ERRORS
from tests.test_wire_agreement import samples as agreement_samples
from tests.test_wire_commands import EXAMPLES as COMMANDS
from tests.test_wire_frames import SAMPLES, STEP

CASES: list[tuple[Codec, Any]] = (
    [(frames._CODEC, m) for m in SAMPLES]
    + [(agreement._CODEC, m) for m in agreement_samples()]
    + [(commands._CODEC, m) for m in COMMANDS]
)

WILD = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, -1, MAX_INT, MAX_INT + 1, (1 << 64) - 1, -(1 << 63)]),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.sampled_from(["x" * MAX_STR, "é" * MAX_STR, "x" * (MAX_STR + 1), "x" * 4097]),
    st.binary(max_size=4),
    st.sampled_from([b"\0" * 24, b"\0" * 25, b"\0" * 32, b"\0" * 65]),
    st.lists(st.integers(-2, 3), max_size=3),
    st.just([0] * (MAX_ITEMS + 1)),
    st.lists(st.text(max_size=2), max_size=2),
    st.dictionaries(st.sampled_from(["kind", "x", "seq"]), st.integers(0, 2), max_size=2),
)


SPECIAL: list[Any] = [
    None, True, False, 0, 1, -1, MAX_INT, MAX_INT + 1, (1 << 64) - 1, -(1 << 63), 0.5, 1e308,
    -1e308, math.inf, -math.inf, math.nan, "", "x", "x" * MAX_STR, "é" * MAX_STR,
    "x" * (MAX_STR + 1), "x" * 4096, "x" * 4097, b"", b"\0" * 24, b"\0" * 25, b"\0" * 64,
    [], [0], [-1], [0] * MAX_ITEMS, [0] * (MAX_ITEMS + 1), ["x"], [b"x"], [None], {},
    {"kind": "nope"}, [{}],
]  # fmt: skip


def _substitutions(value: Any) -> list[Any]:
    """`value` with one field, item or nested field replaced by each SPECIAL value."""
    out: list[Any] = []
    if isinstance(value, dict):
        for key in value:
            out += [value | {key: v} for v in SPECIAL]
            out += [value | {key: v} for v in _substitutions(value[key])]
            out.append({k: v for k, v in value.items() if k != key})
        out += [value | {"zz": 1}, value | {"kind": "nope"}]
    elif isinstance(value, list) and value:
        out += [[v, *value[1:]] for v in SPECIAL + _substitutions(value[0])]
    return out


def _mutate(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """`value` with one change somewhere inside it (or none, now and then)."""
    if isinstance(value, dict) and value and depth < 4:
        op = draw(st.sampled_from(["field", "field", "field", "drop", "add", "kind"]))
        out = dict(value)
        key = draw(st.sampled_from(sorted(out)))
        if op == "drop":
            del out[key]
        elif op == "add":
            out[draw(st.sampled_from(["zz", "kind", "version"]))] = draw(WILD)
        elif op == "kind":
            out["kind"] = draw(st.sampled_from(["nope", "vote", "prepare", 3]))
        else:
            out[key] = _mutate(draw, out[key], depth + 1)
        return out
    if isinstance(value, list) and value and depth < 4 and draw(st.booleans()):
        out_list = list(value)
        i = draw(st.integers(0, len(out_list) - 1))
        out_list[i] = _mutate(draw, out_list[i], depth + 1)
        return out_list
    return draw(WILD)


def _plain(value: Any) -> Any:
    """The body as msgpack hands it back: lists, not tuples."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True))


def _verdict(fn: Any) -> Any:
    try:
        return ("ok", fn())
    except ButterflyError:
        return ("refused", None)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (a dataclass's `==` takes 5 for 5.0
    and True for 1), NaN equal to itself, -0.0 not equal to 0.0."""
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and (
            a == b or (math.isnan(a) and math.isnan(b))
        )
    return bool(a == b)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), case=st.sampled_from(range(len(CASES))))
def test_the_mirror_and_the_codec_agree_on_mutated_bodies(data: st.DataObject, case: int) -> None:
    codec, message = CASES[case]
    body = _plain(codec.to_body(message))
    mutated = _mutate(data.draw, body) if data.draw(st.booleans()) else body
    packed = msgpack.packb(mutated, use_bin_type=True)
    kind = type(message).kind
    slow = _verdict(lambda: codec.from_body(kind, _plain(mutated)))
    decode, convert = codec._mirrors[kind]  # the mirror alone, no codec behind it
    try:
        fast: Any = ("ok", convert(decode(packed)))
    except (*DECODE_ERRORS, ValueError, TypeError):  # what sends a body to the codec
        fast = ("refused", None)
    assert fast[0] == slow[0], (kind, mutated, fast, slow)
    assert _same(fast[1], slow[1])
    # and the codec's entry point gives the codec's verdict whatever the mirror said
    both = _verdict(lambda: codec.from_body_bytes(kind, packed))
    assert both[0] == slow[0] and _same(both[1], slow[1])


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: type(CASES[i][1]).__name__)
def test_the_mirror_and_the_codec_agree_on_every_boundary_of_every_field(case: int) -> None:
    codec, message = CASES[case]
    kind = type(message).kind
    decode, convert = codec._mirrors[kind]
    valid = _plain(codec.to_body(message))
    for body in [valid, *_substitutions(valid)]:
        slow = _verdict(lambda: codec.from_body(kind, _plain(body)))  # noqa: B023
        try:
            fast: Any = ("ok", convert(decode(msgpack.packb(body, use_bin_type=True))))
        except (*DECODE_ERRORS, ValueError, TypeError):
            fast = ("refused", None)
        assert fast[0] == slow[0] and _same(fast[1], slow[1]), (kind, body, fast, slow)


def test_every_kind_of_every_codec_has_a_mirror() -> None:
    for codec in (frames._CODEC, agreement._CODEC, commands._CODEC):
        assert set(codec._mirrors) == set(codec.kinds)


def test_valid_bodies_and_headers_never_reach_the_python_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The point of the mirror: a well-formed frame is decoded in C alone. With the
    codec's own checks made to fail, every sample of every kind still decodes whole."""

    def unused(*_: object) -> None:
        raise AssertionError("a valid body went to the codec's Python checks")

    for codec, message in CASES:
        monkeypatch.setattr(codec, "from_body", unused)
        packed = msgpack.packb(codec.to_body(message), use_bin_type=True)
        assert _same(codec.from_body_bytes(type(message).kind, packed), message)
    monkeypatch.setattr(framing.msgpack, "unpackb", unused)  # the header's checks
    for message in SAMPLES:
        env = Envelope(message, NodeId(1), Epoch(1), "c", 7, False, b"x")
        assert _same(decode_frame(encode_frame(env)[LENGTH.size :], 1 << 20).msg, message)


def test_a_frame_the_mirror_refuses_is_refused_with_the_codecs_words() -> None:
    env = Envelope(STEP, NodeId(1), Epoch(1), "c", 0, False, b"")
    good = encode_frame(env)[LENGTH.size :]
    assert decode_frame(good, 1 << 20).msg == STEP
    bad = _plain(frames.to_body(STEP)) | {"starts": [-1]}
    header = {"v": 2, "c": "c", "e": 1, "s": 1, "id": 0, "r": False, "k": STEP.kind}
    raw = msgpack.packb(header | {"b": bad, "z": ""})
    with pytest.raises(WireFormatError, match=r"stage_step\.starts\[0\] must be in \[0, 2\*\*63\)"):
        decode_frame(len(raw).to_bytes(2, "big") + raw, 1 << 20)
    for field, value, words in [
        ("r", 1, "envelope field 'r' has the wrong type"),
        ("e", True, "envelope field 'e' has the wrong type"),
    ]:
        raw = msgpack.packb(header | {"b": _plain(frames.to_body(STEP)), "z": ""} | {field: value})
        with pytest.raises(WireFormatError, match=words):
            decode_frame(len(raw).to_bytes(2, "big") + raw, 1 << 20)


def _nested(depth: int) -> bytes:
    """A msgpack value `depth` arrays deep around a 1."""
    return b"\x91" * depth + b"\x01"


@pytest.mark.parametrize("depth", [900, 1_000, 5_000])
def test_a_deeply_nested_header_or_body_is_refused_as_malformed(depth: int) -> None:
    """msgspec walks a nested value up to Python's recursion limit: past it, a
    RecursionError, which the reader does not count as a malformed frame (found by a
    review: a 1 KB frame before the handshake got past the transport's handling)."""
    pack = lambda v: msgpack.packb(v, use_bin_type=True)  # noqa: E731
    fields = {"v": 2, "c": "c", "e": 1, "s": 1, "id": 0, "r": False, "k": "ping"}
    head = b"\x89" + b"".join(pack(k) + pack(v) for k, v in fields.items())
    head += pack("b") + _nested(depth) + pack("z") + pack("")
    with pytest.raises(WireFormatError):
        decode_frame(len(head).to_bytes(2, "big") + head, 1 << 20)
    body = b"\x81" + pack("seq") + _nested(depth)  # a ping's body, its field nested
    with pytest.raises(WireFormatError):
        frames._CODEC.from_body_bytes("ping", body)
    # a union member of an agreement message, with a deep field beside its kind
    codec, message = next(
        (c, m) for c, m in CASES if c is agreement._CODEC and type(m).kind == "evidence"
    )
    valid = _plain(codec.to_body(message))
    member = next(k for k, v in valid.items() if isinstance(v, dict) and "kind" in v)
    deep = msgpack.packb({**valid, member: {"zz": 0, **valid[member]}})  # before its kind
    deep = deep.replace(b"\xa2zz\x00", b"\xa2zz" + _nested(depth))
    with pytest.raises(ButterflyError):
        codec.from_body_bytes(type(message).kind, deep)
