"""The latency harness (butterfly.testing.latency) adds its delay, keeps order, and does
not serialise a stream: no timed upper bounds, only what the delay guarantees."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from butterfly.cli.launcher import node_configs
from butterfly.testing.latency import LatencyProxies, delay_cluster

DELAY_S = 0.02


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    """An asyncio TCP echo server on its own loop thread."""
    import threading

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, object] = {}
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            handlers.discard(task)

    async def shut(server: asyncio.Server) -> None:
        # Handlers still reading when the test ends are cancelled and awaited here, so
        # no task or StreamWriter outlives the loop (a writer collected after the loop
        # closed warns, and warnings are errors in this suite).
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        box["server"] = server
        box["port"] = server.sockets[0].getsockname()[1]
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(timeout=10)
    ready.wait(10)
    try:
        yield ("127.0.0.1", int(box["port"]))  # type: ignore[call-overload]
    finally:
        server = box["server"]
        assert isinstance(server, asyncio.Server)
        asyncio.run_coroutine_threadsafe(shut(server), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def test_round_trip_costs_twice_the_delay_and_order_holds(echo: tuple[str, int]) -> None:
    with LatencyProxies(DELAY_S) as proxies:
        port = proxies.add(("127.0.0.1", 0), echo, udp=False)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for i in range(5):
                t0 = time.perf_counter()
                sock.sendall(i.to_bytes(4, "big"))
                assert _recv_exactly(sock, 4) == i.to_bytes(4, "big")
                rtts.append(time.perf_counter() - t0)
            assert min(rtts) >= 2 * DELAY_S
            # a stream of numbered messages written back to back comes back in order
            count = 2000
            payload = b"".join(i.to_bytes(4, "big") for i in range(count))
            sock.sendall(payload)
            echoed = _recv_exactly(sock, len(payload))
            got = [int.from_bytes(echoed[k : k + 4], "big") for k in range(0, len(echoed), 4)]
            assert got == list(range(count))
        assert proxies.stats.bytes >= 2 * (len(payload) + 20)


def test_several_messages_in_flight_share_one_delay(echo: tuple[str, int]) -> None:
    """Ten messages sent 2 ms apart each arrive `delay` after they were sent, not one
    delay after the previous one arrived; asserted through the line's own count of
    chunks waiting at once, so no upper bound on time is needed."""
    with LatencyProxies(DELAY_S) as proxies:
        port = proxies.add(("127.0.0.1", 0), echo, udp=False)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            for i in range(10):
                sock.sendall(i.to_bytes(4, "big"))
                time.sleep(0.002)
            echoed = _recv_exactly(sock, 40)
            elapsed = time.perf_counter() - t0
        assert [int.from_bytes(echoed[k : k + 4], "big") for k in range(0, 40, 4)] == list(
            range(10)
        )
        assert elapsed >= 2 * DELAY_S
        assert proxies.stats.peak_in_flight >= 3


def test_datagrams_are_relayed_after_the_delay() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind(("127.0.0.1", 0))
        target.settimeout(10)
        with LatencyProxies(DELAY_S) as proxies:
            port = proxies.add(("127.0.0.1", 0), target.getsockname())
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                t0 = time.perf_counter()
                sender.sendto(b"beat", ("127.0.0.1", port))
                data, _ = target.recvfrom(64)
                assert data == b"beat"
                assert time.perf_counter() - t0 >= DELAY_S


def test_delay_cluster_moves_each_node_behind_its_proxy(tmp_path: Path) -> None:
    import tomllib

    model = tmp_path / "model"
    model.mkdir()
    cfgs = node_configs(nodes=3, f=0, model=model, api_port=0, data_dir=tmp_path)
    before = [tomllib.loads(p.read_text()) for p in cfgs]
    with delay_cluster(cfgs, DELAY_S):
        after = [tomllib.loads(p.read_text()) for p in cfgs]
        members = after[0]["cluster"]["members"]
        assert members == before[0]["cluster"]["members"]  # peers still dial these
        listens = [d["node"]["listen"] for d in after]
        assert not set(listens) & set(members)  # each node moved off its member address
        assert all(d["cluster"]["members"] == members for d in after)
        # a member address now answers through the proxy: something listens there
        for m in members:
            host, _, port = m.rpartition(":")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.settimeout(5)
                with pytest.raises(OSError):
                    probe.bind((host, int(port)))
