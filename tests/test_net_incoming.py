"""Incoming connections over real loopback sockets: outsiders that never prove a key
share a budget of `network.max_connections`, and a member's connections count against
none (net.tcp). A member that dials a channel again replaces its older connection there,
so links cut without a FIN or RST leave nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

from butterfly.metrics.events import MessageDropped
from butterfly.net.tcp import TcpTransport, TransportLimits
from butterfly.types.errors import ButterflyError, ConnectionFailed
from butterfly.types.ids import NodeId
from butterfly.types.wire.control import StatusQuery
from butterfly.types.wire.data import Release
from tests.test_net import pair, started

pytestmark = pytest.mark.timeout(60)


def open_now(node: TcpTransport) -> int:
    """Connections node accepted and still holds open."""
    return sum(not c.closed for c in node._incoming)


async def read_to_end(reader: asyncio.StreamReader) -> None:
    """Read until the far end closes or resets the connection."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(4096):
            pass


async def test_a_connection_beyond_the_limit_closes_the_oldest_awaiting_its_handshake() -> None:
    a, b, events = pair(limits=TransportLimits(max_connections=1, connect_attempts=1))
    writer = None
    try:
        await started(a, b)
        await a.send(NodeId(1), Release(("x",)), channel="control")  # a member's: no budget
        reader, writer = await asyncio.open_connection(*b.address)  # an outsider's: 1 of 1
        await reader.readexactly(1)  # node 1's Hello begins: the socket was accepted
        await a.request(NodeId(1), StatusQuery(), timeout=2)  # the data channel gets in
        async with asyncio.timeout(5):
            await read_to_end(reader)  # the outsider's socket was the one closed
        drops = [e for e in events if isinstance(e, MessageDropped)]
        assert [e.reason for e in drops] == ["too_many_connections"]
    finally:
        if writer is not None:
            writer.close()
        await a.close()
        await b.close()


async def _hold_slot(address: tuple[str, int], until: float) -> None:
    """One idle outsider socket, reopened whenever the node closes it, until `until`."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(*address)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, until - time.monotonic())):
                    await read_to_end(reader)  # the node's Hello; then its close
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def test_idle_outsider_sockets_do_not_lock_a_member_out() -> None:
    """Outsiders that send not one byte and reopen every socket the node closes fill
    the budget of connections awaiting a handshake; a member still gets in (each of
    its channels), and its connections are not counted there."""
    limits = TransportLimits()  # the defaults: max_connections 100, connect timeout 2 s
    a, b, _events = pair(limits=limits)
    holders: list[asyncio.Task[None]] = []
    try:
        await started(a, b)
        until = time.monotonic() + 4.0
        holders = [
            asyncio.create_task(_hold_slot(b.address, until)) for _ in range(limits.max_connections)
        ]
        for _ in range(200):  # until the outsiders' sockets are open (none sent a byte)
            if open_now(b) >= limits.max_connections:
                break
            await asyncio.sleep(0.01)
        assert open_now(b) >= limits.max_connections
        await a.send(NodeId(1), Release(("x",)), channel="control")
        await a.request(NodeId(1), StatusQuery(), timeout=2)
    finally:
        await asyncio.gather(*holders, return_exceptions=True)  # each ends by `until`
        await a.close()
        await b.close()


class Link:
    """A TCP relay to `target`. `cut()` silences every connection it carries (no byte,
    FIN or RST passes either way after it, the sockets stay open, as when a cable is
    pulled); connections opened after it pass again (the network healed)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.sockets: list[asyncio.StreamWriter] = []
        self.generation = 0  # `cut` moves it on; a relay of an older one is cut

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def cut(self) -> None:
        self.generation += 1

    async def _relay(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection(*self.target)
        self.sockets += [w, tw]
        born = self.generation
        for src, dst in ((r, tw), (tr, w)):
            task = asyncio.create_task(self._pump(src, dst, born))
            self.tasks.add(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, born: int) -> None:
        try:
            while True:
                data = await src.read(64 * 1024)
                if born != self.generation:
                    break  # cut: nothing more passes, not even a close
                if not data:
                    dst.close()  # a close passes while the link is up
                    return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            if born == self.generation:
                dst.close()
                return
        await asyncio.Event().wait()  # cut: hold the other socket open, silent

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.sockets:
            w.close()


async def test_a_member_cut_off_and_back_three_times_keeps_one_connection() -> None:
    """Each cut leaves node 1 a connection of node 0 that nothing closes (node 0's send
    times out, it drops its socket and dials again later). Node 1 (max_connections 3)
    still takes node 0 after three cuts, and holds only its newest connection."""
    limits = TransportLimits(max_connections=3, connect_attempts=1, breaker_threshold=100)
    a, b, _events = pair(limits=limits)
    link = None
    try:
        await started(a, b)
        link = Link(b.address)
        a.peers[NodeId(1)] = await link.start()
        for _ in range(3):
            await a.send(NodeId(1), Release(("x",)), channel="control")  # dials through the link
            link.cut()
            with contextlib.suppress(ButterflyError):  # times out (1 s): node 0 drops its socket
                for _ in range(64):
                    await a.send(NodeId(1), Release(("y",)), bytes(1 << 20), channel="control")
            await asyncio.sleep(0.2)
        refused = ""
        try:
            await a.send(NodeId(1), Release(("z",)), channel="control")  # the link is whole
        except ConnectionFailed as e:
            refused = str(e)
        assert not refused, f"node 1 refuses node 0 after three cut links: {refused}"
        assert open_now(b) == 1, "node 1 kept connections of cut links open"
    finally:
        await a.close()
        await b.close()
        if link is not None:
            await link.close()


async def test_peer_sockets_probe_a_silent_peer() -> None:
    """Both ends turn TCP keepalive on, so a peer gone without a FIN or RST is found
    out by the kernel even when nothing is sent (net.tcp.KEEPALIVE)."""
    a, b, _events = pair()
    try:
        await started(a, b)
        await a.send(NodeId(1), Release(("x",)), channel="control")
        ends = [a._out[(NodeId(1), "control")], *b._incoming]
        for conn in ends:
            sock = conn._writer.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    finally:
        await a.close()
        await b.close()
