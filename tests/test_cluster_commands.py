"""Agreed commands and node keys: what every node must decode, refuse and trust alike."""

from __future__ import annotations

import stat
from pathlib import Path

import msgpack
import pytest

from butterfly.config import load_config
from butterfly.protocol.keys import load_or_create_key, public_keys
from butterfly.types.errors import ConfigError
from butterfly.types.wire.commands import (
    COMMANDS,
    ConfigAbort,
    ConfigUpdate,
    EvictNode,
    InvalidCommand,
    NewPlan,
    decode_command,
    encode_command,
)

EXAMPLES = (
    ConfigUpdate(b'{"kind":"update"}', 3, 77, (0, 1, 2), (2, 2, 1), (b"a" * 64, b"b" * 64, b"")),
    ConfigAbort("ab" * 32, 77),
    EvictNode(2, "two signed proofs disagree"),
    NewPlan(4, (0, 0, 2, 1, 2, 4)),
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
        encode_command(EvictNode(1, "x" * 70_000))


def test_a_node_key_is_created_once_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "node-0" / "node.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path).public == key.public
    path.write_text("not a key")
    with pytest.raises(ConfigError, match="not a signing key"):
        load_or_create_key(path)


def test_public_keys_come_from_config_and_must_match_the_key_file(tmp_path: Path) -> None:
    mine, other = (load_or_create_key(tmp_path / f"k{i}") for i in range(2))
    alone = load_config()
    assert public_keys(alone, mine) == (mine.public,)  # one node: its own key
    members = ["127.0.0.1:9000", "127.0.0.1:9001"]
    two = load_config(overrides={"cluster.members": members})
    with pytest.raises(ConfigError, match="public_keys is empty"):
        public_keys(two, mine)
    listed = {"cluster.members": members, "cluster.public_keys": [other.public.hex()] * 2}
    with pytest.raises(Exception, match="listed twice"):
        load_config(overrides=listed)
    wrong = load_config(
        overrides={**listed, "cluster.public_keys": [other.public.hex(), mine.public.hex()]}
    )
    with pytest.raises(ConfigError, match=r"public_keys\[0\] does not match"):
        public_keys(wrong, mine)
    assert public_keys(wrong, other) == (other.public, mine.public)
