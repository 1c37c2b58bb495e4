"""The transport seam: the in-memory transport and the TCP one both satisfy it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

from butterfly.net.conn import Handler
from butterfly.net.framing import Envelope
from butterfly.types.ids import NodeId
from butterfly.types.wire.base import Ask
from butterfly.types.wire.frames import Message

R = TypeVar("R")


class Transport(Protocol):
    async def start(self, handler: Handler) -> None:
        """Begin serving; every incoming frame is handed to `handler`, whose reply (if
        any) answers a request."""

    async def close(self) -> None: ...

    def set_peers(self, peers: Mapping[NodeId, str]) -> None:
        """The members changed (agreed): a new one may be dialled and may dial in, a
        removed one's connections are closed and its frames refused from now on.
        `peers`: every member's host:port (`cluster.members`)."""

    async def send(
        self, peer: NodeId, msg: Message, payload: bytes = b"", *, channel: str = "data"
    ) -> None:
        """One-way message; raises ConnectionFailed/CircuitOpen when the peer is unreachable."""

    async def request(
        self,
        peer: NodeId,
        msg: Message,
        payload: bytes = b"",
        *,
        timeout: float,
        channel: str = "data",
    ) -> Envelope:
        """Send and wait for the reply with the same correlation id."""

    async def ask(
        self,
        peer: NodeId,
        msg: Ask[R],
        payload: bytes = b"",
        *,
        timeout: float,
        channel: str = "data",
    ) -> tuple[R, bytes]:
        """`request`, answered by the reply `msg` declares (and its payload); a reply of
        another kind is InvalidMessage blaming `peer`."""

    async def broadcast(
        self, msg: Message, payload: bytes = b"", *, channel: str = "control"
    ) -> None:
        """Best effort to every other member."""
