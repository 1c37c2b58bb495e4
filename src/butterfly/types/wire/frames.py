"""The messages a frame may carry (data and control paths) and their codec.

`butterfly.net.framing` puts `to_body(msg)` in the frame header beside the kind and
turns an untrusted (kind, body) back into a message with `from_body`, which raises
`WireFormatError` (the error the connection's reader counts and drops a peer for).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from butterfly.types.errors import WireFormatError
from butterfly.types.wire.base import PROTOCOL_VERSION
from butterfly.types.wire.codec import Codec
from butterfly.types.wire.control import ControlMessage
from butterfly.types.wire.data import DataMessage
from butterfly.types.wire.standby import StandbyMessage

Message = DataMessage | ControlMessage | StandbyMessage

MESSAGE_TYPES: dict[str, type[Any]] = {
    cls.kind: cls
    for part in (DataMessage, ControlMessage, StandbyMessage)
    for cls in typing.get_args(part)
}
_CODEC = Codec(MESSAGE_TYPES, version=PROTOCOL_VERSION, error=WireFormatError)


to_body: Callable[[Message], dict[str, Any]] = _CODEC.to_body
"""A message's fields as the frame header's body map (bound once: this runs per frame)."""


from_body_bytes: Callable[[Any, Any], Message] = _CODEC.from_body_bytes
"""`from_body` of a body still in msgpack bytes (a frame header's, decoded in C)."""


def from_body(kind: Any, body: Any) -> Message:
    """Build a message from an untrusted (kind, body) pair, or raise WireFormatError."""
    msg: Message = _CODEC.from_body(kind, body)
    return msg
