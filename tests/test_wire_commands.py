"""Agreed commands (types.wire.commands): what every node must decode and refuse alike."""

from __future__ import annotations

import msgpack
import pytest

from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.commands import (
    COMMANDS,
    ConfigAbort,
    ConfigUpdate,
    EvictNode,
    InvalidCommand,
    NewPlan,
    ResumeNode,
    SuspendNode,
    TakeOver,
    decode_command,
    encode_command,
)

N0, N1, N2 = NodeId(0), NodeId(1), NodeId(2)
EXAMPLES = (
    ConfigUpdate(b'{"kind":"update"}', 3, 77, (N0, N1, N2), (2, 2, 1), (b"a" * 64, b"b" * 64, b"")),
    ConfigAbort("ab" * 32, 77),
    EvictNode(N2, "two signed proofs disagree"),
    SuspendNode(N2, 2, "left 3 of its last 32 steps unanswered"),
    ResumeNode(N2),
    NewPlan(Epoch(4), (0, 0, 2, 1, 2, 4)),
    TakeOver(N1, 2),
)


def test_every_command_kind_round_trips() -> None:
    assert {type(c) for c in EXAMPLES} == set(COMMANDS)
    for command in EXAMPLES:
        assert decode_command(encode_command(command)) == command


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"kind": "launch_missiles"}, "unknown message kind"),
        ({"node": 1, "reason": "x"}, "unknown message kind None"),
        ({"t": "evict_node", "node": 1, "reason": "x"}, "unknown message kind None"),
        ({"kind": "evict_node", "node": 1}, r"missing fields \['reason'\]"),
        ({"kind": "evict_node", "node": 1, "reason": "x", "extra": 1}, "unknown fields"),
        (
            {"kind": "evict_node", "node": True, "reason": "x"},
            "evict_node.node must be a non-negative integer",
        ),
        ({"kind": "evict_node", "node": "1", "reason": "x"}, "must be a non-negative integer"),
        ({"kind": "evict_node", "node": -1, "reason": "x"}, r"must be in \[0, 2\*\*63\)"),
        (
            {"kind": "new_plan", "epoch": 1, "stages": [0, "1"], "replicas": []},
            r"stages\[1\] must be a non-negative integer",
        ),
        ({"kind": "new_plan", "epoch": 1, "stages": 5, "replicas": []}, "must be an array"),
        ([1, 2], "must be a map"),
    ],
)
def test_malformed_commands_are_refused_with_the_reason(body: object, match: str) -> None:
    with pytest.raises(InvalidCommand, match=match):
        decode_command(msgpack.packb(body))


def test_garbage_and_oversized_commands_are_refused() -> None:
    with pytest.raises(InvalidCommand, match="not valid msgpack"):
        decode_command(b"\xc1\xc1")
    with pytest.raises(InvalidCommand, match="exceeds the 61440-byte limit"):
        decode_command(b"\x00" * 70_000)
    with pytest.raises(InvalidCommand, match="over"):
        encode_command(EvictNode(N1, "x" * 70_000))
