"""Links with added latency between real node processes: a delaying proxy per node.

The kernel's netem is not available here, so latency is added in user space. Each node
gets a proxy on the address its peers dial (`cluster.members`) that forwards to where
the node really listens (`node.listen`), so every link through the cluster, in either
direction, is delayed by the same one-way `delay_s`: a round trip costs `2 * delay_s`.

A delay must not cost bandwidth or reorder bytes, so it is a delay line, not a sleep per
message: per direction of each connection one task reads as fast as the sender writes
and queues each chunk with the time it is due, and another writes chunks out in order
when they fall due. Sleeping per message instead would serialise a stream of frames and
measure a link far slower than one with latency. The nodes' UDP heartbeats are relayed
with the same delay. Everything runs on an event loop in a thread of its own, so a
synchronous benchmark can hold the proxies while it drives the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import tomllib
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from butterfly.cli.launcher import free_ports
from butterfly.config import dump_toml

T = TypeVar("T")
READ_CHUNK = 256 * 1024


@dataclass
class LineStats:
    """What the delay lines carried: `peak_in_flight` > 1 shows chunks overlapped in
    the line (a sleep per message would hold it at 1)."""

    chunks: int = 0
    bytes: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0


async def delay_line(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay_s: float,
    stats: LineStats,
) -> None:
    """Copy `reader` to `writer`, each chunk `delay_s` after it was read, in order."""
    loop = asyncio.get_running_loop()
    due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump() -> None:
        while True:
            data = await reader.read(READ_CHUNK)
            due.put_nowait((loop.time() + delay_s, data))
            if not data:  # EOF travels down the line like data
                return
            stats.chunks += 1
            stats.bytes += len(data)
            stats.in_flight += 1
            stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)

    async def deliver() -> None:
        while True:
            when, data = await due.get()
            if (wait := when - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            stats.in_flight -= 1
            writer.write(data)
            await writer.drain()

    reading = asyncio.ensure_future(pump())
    try:
        await deliver()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
            await reading


class _DelayedDatagrams(asyncio.DatagramProtocol):
    """Relays every datagram to `target` `delay_s` later (UDP keeps no order anyway),
    except those from a port in `dropped` (`LatencyProxies.drop_datagrams`)."""

    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        self.target, self.delay_s = target, delay_s
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped: set[int] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if addr[1] in self.dropped:
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self.delay_s, self._send, data)

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, self.target)


class LatencyProxies:
    """Delaying proxies on an event loop in a thread of their own; close() stops all."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.stats = LineStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._servers: list[asyncio.Server] = []
        self._datagrams: list[asyncio.DatagramTransport] = []
        self._relays: dict[int, _DelayedDatagrams] = {}  # listen port -> its UDP relay
        self._tasks: set[asyncio.Task[None]] = set()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def add(self, listen: tuple[str, int], target: tuple[str, int], udp: bool = True) -> int:
        """Proxy `listen` -> `target` (TCP, and UDP unless `udp` is false); returns the
        port listened on (the OS picks one for port 0)."""
        return self._run(self._add(listen, target, udp))

    async def _add(self, listen: tuple[str, int], target: tuple[str, int], udp: bool) -> int:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                up_reader, up_writer = await asyncio.open_connection(*target)
            except OSError:
                writer.close()
                self._tasks.discard(task)
                return
            try:
                await asyncio.gather(
                    delay_line(reader, up_writer, self.delay_s, self.stats),
                    delay_line(up_reader, writer, self.delay_s, self.stats),
                    return_exceptions=True,
                )
            except asyncio.CancelledError:
                pass  # close(): ends here rather than as a cancelled server callback
            finally:
                up_writer.close()
                writer.close()
                self._tasks.discard(task)

        server = await asyncio.start_server(accept, *listen)
        self._servers.append(server)
        port = int(server.sockets[0].getsockname()[1])
        if udp:
            relay = _DelayedDatagrams(target, self.delay_s)
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: relay, local_addr=(listen[0], port)
            )
            self._datagrams.append(transport)
            self._relays[port] = relay
        return port

    def drop_datagrams(self, listen_port: int, from_port: int, dropped: bool = True) -> None:
        """Lose (or, with `dropped` false, relay again) the datagrams that reach the proxy
        on `listen_port` from `from_port`: one node's heartbeats to one peer, the other
        direction and every TCP connection untouched (a one-sided stall)."""
        relay = self._relays[listen_port]

        def change() -> None:
            (relay.dropped.add if dropped else relay.dropped.discard)(from_port)

        self._loop.call_soon_threadsafe(change)

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for transport in self._datagrams:
            transport.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(TimeoutError):
            self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> LatencyProxies:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def delay_cluster(configs: Sequence[Path], delay_s: float) -> LatencyProxies:
    """Put a delaying proxy in front of every node of a loopback cluster's configs.

    Peers keep dialing `cluster.members`; each node is moved to a fresh port
    (`node.listen`, rewritten in its TOML before it starts) and a proxy takes its member
    address. Call before starting the nodes; close the proxies after stopping them.
    """
    docs = [tomllib.loads(p.read_text()) for p in configs]
    members = [str(m) for m in docs[0]["cluster"]["members"]]
    taken = frozenset(_hostport(m)[1] for m in members)
    real = free_ports(len(members), avoid=taken)
    proxies = LatencyProxies(delay_s)
    try:
        for i, (path, doc) in enumerate(zip(configs, docs, strict=True)):
            host, _ = _hostport(members[i])
            doc["node"]["listen"] = f"{host}:{real[i]}"
            path.write_text(dump_toml(doc))
            proxies.add(_hostport(members[i]), (host, real[i]))
    except BaseException:
        proxies.close()
        raise
    return proxies


__all__ = ["LatencyProxies", "LineStats", "delay_cluster", "delay_line"]
