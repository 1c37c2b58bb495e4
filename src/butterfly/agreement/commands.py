"""The operations the cluster agrees on, one frozen tagged type each, and their codec.

A command is what a PBFT request carries (its `operation` bytes): every node executes the
same commands in the same order, so each must be decoded identically everywhere and
refused identically when malformed. The wire form is a msgpack map `{"t": tag, ...fields}`
whose keys must be exactly the class's fields, each of its declared type; anything else is
`InvalidCommand`, never a crash (a Byzantine client may order garbage).

To add a command kind: declare a frozen dataclass with a unique `tag` and fields of the
types below, and add it to `Command` and `COMMANDS`. Field types understood: `int`, `str`,
`bytes`, `bool`, and `tuple[X, ...]` of those.

    tag             effect when executed
    config_update   apply an agreed config proposal at config sequence `seq` (seed 002)
    config_abort    a timed-out proposal must not apply if it has not yet
    evict_node      remove a node proven faulty (evidence) from the membership
    new_plan        the stage plan of an epoch: flat (node, start, end) triples of the
                    chain, and of the replicas (auditors and standbys)
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from butterfly.types.errors import InvalidMessage

MAX_COMMAND_BYTES = 60 * 1024
"""A PBFT request's operation holds at most 64 KiB; keep clear of it."""


class InvalidCommand(InvalidMessage):
    """An ordered operation that is not a well-formed command; every node skips it."""


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    """COMMIT of a config proposal (`proposal`: its canonical JSON bytes).

    `vote_nodes`, `vote_seqs` and `vote_signatures` are the 2f+1 signed PREPARE OKs (node,
    the last config seq it had applied, its signature); `seq` must be one more than the
    highest of those, so every node activates the change at the same config sequence.
    `nonce` names this attempt, so an abort cancels it and not a later retry.
    """

    tag: ClassVar[str] = "config_update"
    proposal: bytes
    seq: int
    nonce: int
    vote_nodes: tuple[int, ...]
    vote_seqs: tuple[int, ...]
    vote_signatures: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ConfigAbort:
    """Roll back an update attempt whose commit timed out, unless it already applied: of the
    two, whichever the agreement orders first decides, on every node alike."""

    tag: ClassVar[str] = "config_abort"
    digest: str
    nonce: int


@dataclass(frozen=True, slots=True)
class EvictNode:
    tag: ClassVar[str] = "evict_node"
    node: int
    reason: str


@dataclass(frozen=True, slots=True)
class NewPlan:
    tag: ClassVar[str] = "new_plan"
    epoch: int
    stages: tuple[int, ...]  # (node, start, end) triples, half-open layer ranges
    replicas: tuple[int, ...] = ()  # the same, for further holders of the chain's ranges


Command = ConfigUpdate | ConfigAbort | EvictNode | NewPlan
COMMANDS: tuple[type[Command], ...] = (ConfigUpdate, ConfigAbort, EvictNode, NewPlan)

Check = Callable[[Any, str], Any]


def _check_for(tp: Any) -> Check:
    if typing.get_origin(tp) is tuple:
        item = _check_for(typing.get_args(tp)[0])

        def check_tuple(value: Any, where: str) -> Any:
            if type(value) is not list:
                raise InvalidCommand(f"{where} must be a list, got {type(value).__name__}")
            return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

        return check_tuple

    def check_plain(value: Any, where: str) -> Any:
        if type(value) is not tp:  # exact: a bool is not an int here
            raise InvalidCommand(f"{where} must be {tp.__name__}, got {type(value).__name__}")
        return value

    return check_plain


def _fields(cls: type[Any]) -> dict[str, Check]:
    hints = typing.get_type_hints(cls)
    return {f.name: _check_for(hints[f.name]) for f in dataclasses.fields(cls)}


_BY_TAG: dict[str, type[Command]] = {cls.tag: cls for cls in COMMANDS}
_CHECKS: dict[str, dict[str, Check]] = {tag: _fields(cls) for tag, cls in _BY_TAG.items()}


def encode_command(command: Command) -> bytes:
    body: dict[str, Any] = {"t": command.tag}
    for name in _CHECKS[command.tag]:
        value = getattr(command, name)
        body[name] = list(value) if isinstance(value, tuple) else value
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_COMMAND_BYTES:
        raise InvalidCommand(f"{command.tag} is {len(data)} bytes, over {MAX_COMMAND_BYTES}")
    return data


def decode_command(data: bytes) -> Command:
    """Parse an ordered operation; raises `InvalidCommand` naming what was wrong."""
    if len(data) > MAX_COMMAND_BYTES:
        raise InvalidCommand(f"command of {len(data)} bytes is over {MAX_COMMAND_BYTES}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise InvalidCommand(f"command is not valid msgpack: {e}") from None
    if type(body) is not dict:
        raise InvalidCommand(f"command must be a map, got {type(body).__name__}")
    tag = body.pop("t", None)
    if not isinstance(tag, str) or tag not in _BY_TAG:
        raise InvalidCommand(f"unknown command tag {tag!r}")
    checks = _CHECKS[tag]
    if body.keys() != checks.keys():
        raise InvalidCommand(
            f"{tag} must have fields {sorted(checks)}, got {sorted(map(str, body))}"
        )
    values = {name: check(body[name], f"{tag}.{name}") for name, check in checks.items()}
    return _BY_TAG[tag](**values)


__all__ = [
    "COMMANDS",
    "Command",
    "ConfigAbort",
    "ConfigUpdate",
    "EvictNode",
    "InvalidCommand",
    "NewPlan",
    "decode_command",
    "encode_command",
]
