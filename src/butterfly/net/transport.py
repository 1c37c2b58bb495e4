"""The transport seam: the in-memory transport and the TCP one both satisfy it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

from butterfly.net.conn import Handler
from butterfly.net.framing import Envelope
from butterfly.types.errors import StageLost
from butterfly.types.ids import NodeId
from butterfly.types.wire.base import Ask
from butterfly.types.wire.frames import Message

R = TypeVar("R")
T = TypeVar("T")

FAILED_POLL_S = 0.05
"""How often a wait for a peer's answer looks whether the failure detector declared it
failed (a look is a dictionary read and a little arithmetic)."""


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


async def unless_failed(
    node: NodeId, asking: Awaitable[T], failed: Callable[[NodeId], bool], what: str
) -> T:
    """`asking`'s answer, or StageLost once the failure detector declares `node` failed
    (`failed`) before it comes: a peer frozen or cut off keeps its connection open, and
    an ask of it waited out its whole timeout after the detector had given up on it (an
    audit held its answer 60 s; a gateway's first plan waited 5 s for a dead standby's
    tasks before it watched for failures at all: reviews)."""
    answer = asyncio.ensure_future(asking)
    try:
        while not answer.done():
            if failed(node):
                raise StageLost(f"node {node} was declared failed during the {what}")
            await asyncio.wait((answer,), timeout=FAILED_POLL_S)
        return answer.result()
    finally:
        answer.cancel()  # nothing once done; the ask, when given up or cancelled
