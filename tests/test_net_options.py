"""The `network` options a node's transport is built with, by their effect on a real
dialler over loopback (README, "Other settings that take effect"): `retry_*` shape the
waits between connect attempts (exponential backoff with jitter, capped), and
`send_timeout_ms` closes a connection whose peer takes no data (and only such a one: a
frame larger than the link carries in that time goes at the link's pace)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from butterfly.config import load_config
from butterfly.net.framing import Envelope
from butterfly.net.tcp import TcpTransport, TransportLimits
from butterfly.types.errors import ConnectionFailed, SendTimeout
from butterfly.types.ids import NodeId
from butterfly.types.wire.control import Heartbeat, StatusQuery
from butterfly.wiring.edges import transport_limits
from tests.test_net import Events, echo, identity, pair, started

pytestmark = pytest.mark.timeout(60)


def limits(**network: int) -> TransportLimits:
    """The limits a node builds its transport with, from `network.*` overrides."""
    cfg = load_config(env={}, overrides={f"network.{k}": v for k, v in network.items()})
    return transport_limits(cfg.network)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: every connect is refused at once, and
    no other process can take the port meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def dialler(port: int, lim: TransportLimits, waits: list[float] | None = None) -> TcpTransport:
    """Node 0's transport, with node 1 at `port`; `waits` records each wait between
    connect attempts (and skips it) when given."""

    async def recorded(delay: float) -> None:
        assert waits is not None
        waits.append(delay)

    return TcpTransport(
        identity=identity(0),
        listen=("127.0.0.1", 0),
        peers={NodeId(1): ("127.0.0.1", port)},
        emit=Events(),
        epoch=lambda: 0,
        limits=lim,
        **({"sleep": recorded} if waits is not None else {}),
    )


async def dial_refused(transport: TcpTransport) -> None:
    try:
        with pytest.raises(ConnectionFailed, match="cannot connect to node 1"):
            await transport.send(NodeId(1), Heartbeat(NodeId(0), 0, 0), channel="control")
    finally:
        await transport.close()


async def test_connect_retries_back_off_exponentially_with_jitter_up_to_the_cap(
    closed_port: int,
) -> None:
    lim = limits(retry_attempts=5, retry_backoff_ms=100, retry_max_backoff_ms=300)
    lim = replace(lim, breaker_threshold=1000)  # 12 failed dials: keep the circuit closed
    sequences: list[list[float]] = []
    for _ in range(12):
        waits: list[float] = []
        await dial_refused(dialler(closed_port, lim, waits))
        sequences.append(waits)
    for waits in sequences:
        assert len(waits) == 4  # 5 attempts: a wait between each two
        first, second, *capped = waits
        assert 0.1 <= first <= 0.2  # the backoff, plus up to one backoff of jitter
        assert 0.2 <= second <= 0.3  # doubled
        assert capped == [0.3, 0.3]  # 0.4 and 0.8 plus jitter, held to the cap
    firsts = [waits[0] for waits in sequences]
    assert len(set(firsts)) == len(firsts)  # jittered: no two dials wait alike
    assert max(firsts) - min(firsts) > 0.02  # spread over the jitter's range, not a nudge


async def test_a_dial_really_waits_out_its_backoff(closed_port: int) -> None:
    lim = limits(retry_attempts=4, retry_backoff_ms=50, retry_max_backoff_ms=100)
    start = time.monotonic()
    await dial_refused(dialler(closed_port, lim))
    # waits of >= 50, >= 100 (capped at 100) and 100 ms; the upper bound only says the
    # attempts did not hang (a loaded machine may stretch every wait)
    assert 0.25 <= time.monotonic() - start < 20


def established_to(port: int) -> int:
    """Open TCP connections of this machine whose far end is local port `port`: the
    dialler's side of each connection to a listener there (Linux's /proc/net/tcp)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rpartition(":")[2], 16) == port and fields[3] == "01":
                count += 1
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
async def test_a_peer_that_takes_no_data_fails_the_send_and_its_connection_closes() -> None:
    released = asyncio.Event()

    async def stuck(peer: NodeId, env: Envelope) -> None:  # never done: the peer stops reading
        await released.wait()

    # node 1 runs one handler at a time, so with this one stuck it reads nothing more
    taker = TcpTransport(
        identity=identity(1),
        listen=("127.0.0.1", 0),
        peers={NodeId(0): ("127.0.0.1", 0)},
        emit=Events(),
        epoch=lambda: 0,
        limits=TransportLimits(max_handlers=1),
    )
    await taker.start(stuck)
    port = taker.address[1]
    sender = dialler(port, limits(send_timeout_ms=1500))  # not the default 1 s
    await sender.start(echo)
    payload = bytes(1 << 20)
    try:
        await sender.send(NodeId(1), Heartbeat(NodeId(0), 0, 0), payload)
        assert established_to(port) == 1
        failed_after = -1.0
        async with asyncio.timeout(30):
            for _ in range(500):  # a few MiB fill the socket buffers on loopback
                start = time.monotonic()
                try:
                    await sender.send(NodeId(1), Heartbeat(NodeId(0), 0, 0), payload)
                except SendTimeout as e:
                    failed_after = time.monotonic() - start
                    assert e.retriable and "network.send_timeout_ms" in str(e)
                    break
        assert failed_after >= 1.5  # it gave the peer send_timeout_ms to take some
        for _ in range(100):  # bounded: the socket closes at once, without the peer
            if established_to(port) == 0:
                break
            await asyncio.sleep(0.05)
        assert established_to(port) == 0
    finally:
        released.set()
        await sender.close()
        await taker.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float) -> None:
    try:
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
            if rate:
                await asyncio.sleep(len(data) / rate)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def throttled_proxy(
    target: tuple[str, int], rate: float
) -> tuple[asyncio.Server, set[asyncio.Task[None]]]:
    """A TCP relay to `target` that forwards the dialer's bytes at `rate` bytes/s."""
    tasks: set[asyncio.Task[None]] = set()

    async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection(*target)
        for t in (_pump(r, tw, rate), _pump(tr, w, 0)):
            tasks.add(asyncio.create_task(t))

    return await asyncio.start_server(relay, "127.0.0.1", 0), tasks


async def test_a_peer_taking_data_steadily_is_not_timed_out_on_a_large_frame() -> None:
    """A 24 MiB frame over a link carrying 4 MiB/s without pause arrives, although the
    link takes far longer than `send_timeout_ms` (1 s) to carry it (socket buffers
    hold some 10 MiB on loopback): the timeout waits on the peer taking no data, not on
    the whole frame leaving."""
    a, b, _events = pair()
    proxy, tasks = None, set()
    try:
        await started(a, b)
        proxy, tasks = await throttled_proxy(b.address, rate=4 << 20)
        a.peers[NodeId(1)] = proxy.sockets[0].getsockname()[:2]  # node 0 reaches 1 via the link
        _reply, payload = await a.ask(NodeId(1), StatusQuery(), bytes(24 << 20), timeout=30)
        assert len(payload) == 24 << 20  # echoed back
    finally:
        await a.close()
        await b.close()
        if proxy is not None:
            proxy.close()
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
