"""A membership change reaches the TCP transport (`TcpTransport.set_peers` with the
roster's key dict, updated in place): a removed member's open connections close, it
can neither be dialled nor handshake again, and an added member can do both at once."""

from __future__ import annotations

import pytest

from butterfly.metrics.events import MessageDropped
from butterfly.net.framing import Envelope
from butterfly.net.tcp import Identity, TcpTransport, TransportLimits
from butterfly.protocol.sign import SigningKey
from butterfly.types.errors import ButterflyError, ConnectionFailed
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.control import StatusQuery, StatusReply

pytestmark = pytest.mark.timeout(60)
KEYS = [SigningKey.from_seed(bytes([i + 1]) * 32) for i in range(4)]
LIMITS = TransportLimits(connect_attempts=1)


async def echo(peer: NodeId, env: Envelope) -> tuple[StatusReply, bytes] | None:
    if isinstance(env.msg, StatusQuery):
        return StatusReply(NodeId(7), env.epoch, (0, 2), 1, 0, 1e9, 1 << 30), b""
    return None


class Node:
    """One transport with its own roster: the keys dict and addresses it was handed."""

    def __init__(self, i: int, members: range) -> None:
        self.keys = {NodeId(j): KEYS[j].public for j in members}
        self.dropped: list[str] = []
        self.t = TcpTransport(
            identity=Identity(NodeId(i), "c", "m", key=KEYS[i], keys=self.keys),
            listen=("127.0.0.1", 0),
            peers={},
            emit=lambda e: self.dropped.append(e.reason) if isinstance(e, MessageDropped) else None,
            epoch=lambda: Epoch(3),
            limits=LIMITS,
        )

    def follow(self, keys: dict[NodeId, bytes], addresses: dict[NodeId, str]) -> None:
        """What the roster listener does on an agreed change."""
        for gone in [n for n in self.keys if n not in keys]:
            del self.keys[gone]
        self.keys.update(keys)
        self.t.set_peers(addresses)


async def answers(a: Node, b: int) -> bool:
    try:
        await a.t.request(NodeId(b), StatusQuery(), timeout=2.0, channel="control")
    except ButterflyError:
        return False
    return True


async def test_a_removed_member_is_cut_off_and_an_added_one_let_in() -> None:
    nodes = [Node(i, range(3)) for i in range(3)]
    nodes.append(Node(3, range(4)))  # started later with the roster that lists it
    for n in nodes:
        await n.t.start(echo)
    addresses = {NodeId(i): "{}:{}".format(*n.t.address) for i, n in enumerate(nodes)}
    try:
        three = {n: a for n, a in addresses.items() if n < 3}
        for n in nodes:
            n.t.set_peers(three if n is not nodes[3] else addresses)
        assert await answers(nodes[2], 0) and await answers(nodes[0], 2)
        assert not await answers(nodes[3], 0)  # not a member yet: its handshake is refused
        assert "handshake_refused" in nodes[0].dropped

        # node 2 removed, node 3 added: agreed, applied on nodes 0, 1 and 3 (node 2 lies)
        after = {NodeId(j): KEYS[j].public for j in (0, 1, 3)}
        live = {n: a for n, a in addresses.items() if n != 2}
        for i in (0, 1, 3):
            nodes[i].follow(after, live)
        with pytest.raises(ConnectionFailed, match="not a member"):
            await nodes[0].t.request(NodeId(2), StatusQuery(), timeout=2.0, channel="control")
        nodes[0].dropped.clear()
        assert not await answers(nodes[2], 0)  # its open connection was closed ...
        assert not await answers(nodes[2], 0)  # ... and a new one is refused
        assert "handshake_refused" in nodes[0].dropped
        assert await answers(nodes[3], 0) and await answers(nodes[0], 3)
        assert await answers(nodes[1], 0)
    finally:
        for n in nodes:
            await n.t.close()
