"""Message routing: every incoming frame to the one handler of its kind.

The table (message type -> handler) is written once, in the composition root, and given
to `start` with the transport, as a transport is given its handler: no part is reached
before it exists. A handler receives the peer the connection authenticated (the node the
TCP handshake named; for the in-memory transport, the sending transport's node; for a
message this node sends itself, this node), never the sender the frame claims, so a rule
about who may send a kind is a rule about that peer. A frame whose claimed sender is not
that peer is dropped and counted (`sender_mismatch`): an honest node never sends one.
Then the peer must be entitled to send the kind (`protocol.entitled`, one table of
rules); the router checks every kind but the few whose handler has the context the
rule needs (a step's route, the plan of its epoch).

Sends go through here too: a message to this node itself is routed without a socket, so
the pipeline engine and the stage servers address a step the same way whether the next
stage is this node or another.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from butterfly.metrics.events import Emit, MessageDropped
from butterfly.net.conn import Reply
from butterfly.net.framing import Envelope, answer_to, as_message
from butterfly.net.transport import Transport
from butterfly.protocol.entitled import CHECKED_BY_HANDLER, Context, entitled
from butterfly.types.errors import ServiceUnavailable
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.base import Ask
from butterfly.types.wire.frames import Message

log = logging.getLogger(__name__)
R = TypeVar("R")

Route = Callable[[NodeId, Envelope], Awaitable[Reply | None]]
Routes = Mapping[type[Message], Route]


class Router:
    def __init__(
        self,
        *,
        node: NodeId,
        transport: Transport,
        cluster_id: str,
        epoch: Callable[[], Epoch],
        ask_timeout_s: Callable[[], float],
        emit: Emit,
        plan: Callable[[], StagePlan | None],
        gateway: Callable[[], NodeId],
    ) -> None:
        """`epoch`: stamped on messages to this node itself, as the transport stamps the
        others. `ask_timeout_s`: how long `ask` waits for a peer's answer (read on every
        ask: network.step_timeout_ms is live). `plan` (the plan in force) and `gateway` (the
        acting gateway as agreed, `control.gateway_role`) are what the entitlement rules
        judge a peer by; both are read on every frame."""
        self.node, self._transport, self._cluster_id = node, transport, cluster_id
        self._epoch, self._ask_timeout, self._emit = epoch, ask_timeout_s, emit
        self._plan, self._gateway = plan, gateway
        self._routes: dict[type[Message], Route] = {}

    async def start(self, routes: Routes) -> None:
        """Serve incoming frames with `routes`, one handler per message type."""
        self._routes = dict(routes)
        await self._transport.start(self.dispatch)

    async def close(self) -> None:
        await self._transport.close()

    async def dispatch(self, peer: NodeId, env: Envelope) -> Reply | None:
        """The transport's handler: `peer` is the connection's authenticated node."""
        msg = env.msg
        if env.sender != peer:
            self._emit(MessageDropped(reason="sender_mismatch"))
            log.warning("dropped %s from node %s claiming node %s", msg.kind, peer, env.sender)
            return None
        route = self._routes.get(type(msg))
        if route is None:
            self._emit(MessageDropped(reason=f"unexpected_{msg.kind}"))
            return None
        if not isinstance(msg, CHECKED_BY_HANDLER) and not entitled(
            msg, peer, Context(self.node, self._gateway(), self._plan())
        ):
            self._emit(MessageDropped(reason=f"not_entitled_{msg.kind}"))
            log.warning("dropped %s from node %s: not entitled to send it", msg.kind, peer)
            return None
        return await route(peer, env)

    def _local(self, msg: Message, payload: bytes = b"") -> Envelope:
        return Envelope(msg, self.node, self._epoch(), self._cluster_id, 0, False, payload)

    async def deliver(self, peer: NodeId, msg: Message, payload: bytes = b"") -> None:
        """Send to a peer, or hand to this node's own handler without a socket."""
        if peer == self.node:
            await self.dispatch(self.node, self._local(msg, payload))
        else:
            await self._transport.send(peer, msg, payload)

    async def ask(self, node: NodeId, msg: Ask[R]) -> R:
        """Request/response with a node, this one included (no socket then); the reply is
        the one `msg` declares, or InvalidMessage blaming the node asked."""
        if node == self.node:
            request = as_message(msg)
            answer = await self.dispatch(self.node, self._local(request))
            if answer is None:
                raise ServiceUnavailable(f"node {node} has no answer to {request.kind}")
            return answer_to(msg, answer[0], node)
        reply, _ = await self._transport.ask(
            node, msg, timeout=self._ask_timeout(), channel="control"
        )
        return reply


def by_envelope(handler: Callable[[Envelope], Awaitable[Reply | None]]) -> Route:
    """A route for a handler that reads the envelope only: the agreement's frames and
    config votes are signed, and those parts check the signer themselves."""

    async def route(peer: NodeId, env: Envelope) -> Reply | None:
        return await handler(env)

    return route


__all__ = ["Route", "Router", "Routes", "by_envelope"]
