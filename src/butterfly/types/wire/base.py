"""What every message module shares: the protocol version, field aliases, request/reply.

A request declares its reply by subclassing `Ask[Reply]`; the transports' `ask` is typed
by it (asking a `CacheQuery` returns a `CacheLengths`) and checks the kind once, so no
caller inspects a reply's type itself.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Generic, TypeVar

from butterfly.types.wire.checks import Size

PROTOCOL_VERSION = 2
"""Checked in every handshake, frame and signed message. 2: one schema, typed ids, commands
and agreement messages tagged by `kind`, one heartbeat."""

Digest = Annotated[bytes, Size(32, 32)]
Signature = Annotated[bytes, Size(0, 64)]
Blob = Annotated[bytes, Size(0, 1 << 16)]
Text = Annotated[str, Size(0, 4096)]
"""Free text a node reports (an error, a reason): longer than a name, still bounded."""

R = TypeVar("R", covariant=True)

_REPLIES: dict[type[Any], type[Any]] = {}


class Ask(Generic[R]):
    """A request answered by one `R`; subclass it as `Ask[TheReply]` (reply defined first)."""

    __slots__ = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__dict__.get("__orig_bases__", ()):
            if typing.get_origin(base) is Ask:
                (reply,) = typing.get_args(base)
                if not isinstance(reply, type):
                    raise TypeError(f"{cls.__name__} must name its reply class, not {reply!r}")
                _REPLIES[cls] = reply


def reply_type(request: Ask[R]) -> type[R]:
    """The reply class `request` declared."""
    reply: type[R] = _REPLIES[type(request)]
    return reply
