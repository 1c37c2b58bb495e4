"""Transport benchmark: one decode-step and one prefill-sized tensor, there and back.

Prints one JSON object. A client (this process) and an echo server (a child process per
transport) on 127.0.0.1 exchange a [1,1,768] and a [1,128,768] fp32 tensor. Every
contender carries the same bytes: Butterfly's frame (framing.py envelope) around the
tensor encoding of runtime/wire.py; the server decodes frame and tensor and encodes them
again, as a stage does minus the forward pass. A round trip is timed from the client's
encode to its decoded answer. Rounds alternate between contenders (all servers run at
once, idle ones asleep), so the machine's drift hits all alike.

Contenders: Butterfly's TcpTransport (request/response with correlation ids), raw
asyncio streams with the same framing, a blocking TCP socket (the floor), pyzmq REQ/REP,
and grpcio aio unary and bidirectional-streaming calls (skipped if not installed; they
are in the optional `bench` extra).

    python bench/transport.py [--trips 2000] [--warmup 200] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from butterfly.metrics.events import discard
from butterfly.net.framing import LENGTH, Envelope, decode_frame, encode_frame
from butterfly.net.tcp import Identity, TcpTransport
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.types.ids import NodeId
from butterfly.types.wire.data import Ping, Pong
from common import machine, summary

SHAPES = {"decode_1x1x768": (1, 1, 768), "prefill_1x128x768": (1, 128, 768)}
MAX = 64 * 1024 * 1024
KEYS = [SigningKey.from_seed(bytes([i + 1]) * 32) for i in range(2)]
"""Both ends' node keys (the server is a child process: seeded, so both know them)."""


def ident(node: int) -> Identity:
    publics = {NodeId(i): k.public for i, k in enumerate(KEYS)}
    return Identity(NodeId(node), "bench", "m", key=KEYS[node], keys=publics)


KINDS = ["butterfly_tcp", "asyncio_streams", "blocking_socket", "pyzmq_req_rep"]
GRPC_KINDS = ["grpc_aio_unary", "grpc_aio_streaming"]


def frame(seq: int, t: torch.Tensor, reply: bool = False) -> bytes:
    msg = Pong(seq, 0) if reply else Ping(seq)
    return encode_frame(Envelope(msg, 0, 1, "bench", seq, reply, encode_tensor(t)))


def echo(rest: bytes) -> bytes:
    """What every server does with a frame (after its length prefix): decode, re-encode."""
    env = decode_frame(rest, MAX)
    return frame(env.corr_id, decode_tensor(env.payload, MAX), reply=True)


def unframe(rest: bytes) -> torch.Tensor:
    return decode_tensor(decode_frame(rest, MAX).payload, MAX)


# ---- servers (child processes; each prints its port, then serves until killed) ----


async def serve_butterfly() -> None:
    async def handler(peer: NodeId, env: Envelope) -> tuple[Pong, bytes]:
        assert isinstance(env.msg, Ping)
        return Pong(env.msg.seq, len(env.payload)), encode_tensor(decode_tensor(env.payload, MAX))

    t = TcpTransport(
        identity=ident(1),
        listen=("127.0.0.1", 0),
        peers={NodeId(0): ("127.0.0.1", 9), NodeId(1): ("127.0.0.1", 0)},
        emit=discard,
        epoch=lambda: 1,
    )
    await t.start(handler)
    print(t.address[1], flush=True)
    await asyncio.Event().wait()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve_asyncio() -> None:
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        while True:
            (n,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
            writer.write(echo(await reader.readexactly(n)))
            await writer.drain()

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("peer closed")
        got += k
    return bytes(buf)


def serve_blocking() -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    print(lsock.getsockname()[1], flush=True)
    sock, _ = lsock.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        (n,) = LENGTH.unpack(_recv_exactly(sock, LENGTH.size))
        sock.sendall(echo(_recv_exactly(sock, n)))


def serve_zmq() -> None:
    import zmq

    sock = zmq.Context().socket(zmq.REP)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    while True:
        sock.send(echo(sock.recv(copy=True)[LENGTH.size :]), copy=False)


async def serve_grpc() -> None:
    import grpc

    async def unary(req: bytes, ctx: Any) -> bytes:
        return echo(req[LENGTH.size :])

    async def stream(it: Any, ctx: Any) -> Any:
        async for req in it:
            yield echo(req[LENGTH.size :])

    opts = [("grpc.max_receive_message_length", MAX), ("grpc.max_send_message_length", MAX)]
    server = grpc.aio.server(options=opts)
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


SERVERS: dict[str, Callable[[], Any]] = {
    "butterfly_tcp": lambda: asyncio.run(serve_butterfly()),
    "asyncio_streams": lambda: asyncio.run(serve_asyncio()),
    "blocking_socket": serve_blocking,
    "pyzmq_req_rep": serve_zmq,
    "grpc": lambda: asyncio.run(serve_grpc()),
}

# ---- clients: each returns an async `trip(tensor) -> tensor` ----

Trip = Callable[[torch.Tensor], Awaitable[torch.Tensor]]


async def client_butterfly(port: int) -> Trip:
    t = TcpTransport(
        identity=ident(0),
        listen=("127.0.0.1", 0),
        peers={NodeId(0): ("127.0.0.1", 0), NodeId(1): ("127.0.0.1", port)},
        emit=discard,
        epoch=lambda: 1,
    )
    seq = iter(range(1, 1 << 62))

    async def trip(x: torch.Tensor) -> torch.Tensor:
        env = await t.request(NodeId(1), Ping(next(seq)), encode_tensor(x), timeout=10)
        return decode_tensor(env.payload, MAX)

    return trip


async def client_asyncio(port: int) -> Trip:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _nodelay(writer)
    seq = iter(range(1, 1 << 62))

    async def trip(x: torch.Tensor) -> torch.Tensor:
        writer.write(frame(next(seq), x))
        await writer.drain()
        (n,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
        return unframe(await reader.readexactly(n))

    return trip


async def client_blocking(port: int) -> Trip:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    seq = iter(range(1, 1 << 62))

    async def trip(x: torch.Tensor) -> torch.Tensor:  # blocks the loop, on purpose
        sock.sendall(frame(next(seq), x))
        (n,) = LENGTH.unpack(_recv_exactly(sock, LENGTH.size))
        return unframe(_recv_exactly(sock, n))

    return trip


async def client_zmq(port: int) -> Trip:
    import zmq

    sock = zmq.Context().socket(zmq.REQ)
    sock.connect(f"tcp://127.0.0.1:{port}")
    seq = iter(range(1, 1 << 62))

    async def trip(x: torch.Tensor) -> torch.Tensor:  # blocking REQ socket
        sock.send(frame(next(seq), x), copy=False)
        return unframe(sock.recv(copy=True)[LENGTH.size :])

    return trip


async def client_grpc(port: int, streaming: bool) -> Trip:
    import grpc

    opts = [("grpc.max_receive_message_length", MAX), ("grpc.max_send_message_length", MAX)]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts)
    seq = iter(range(1, 1 << 62))
    if not streaming:
        call = channel.unary_unary("/bench/Echo")

        async def trip(x: torch.Tensor) -> torch.Tensor:
            return unframe((await call(frame(next(seq), x)))[LENGTH.size :])

        return trip
    stream = channel.stream_stream("/bench/Stream")()

    async def strip(x: torch.Tensor) -> torch.Tensor:
        await stream.write(frame(next(seq), x))
        return unframe((await stream.read())[LENGTH.size :])

    return strip


def start_server(kind: str) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", kind],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"{kind} server did not start")
    return proc, int(line)


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return round(s[min(len(s) - 1, round(p * (len(s) - 1)))], 1)


async def measure(args: argparse.Namespace, kinds: list[str]) -> dict[str, Any]:
    procs: list[subprocess.Popen[str]] = []
    try:
        ports: dict[str, int] = {}
        for kind in {"grpc" if k.startswith("grpc") else k for k in kinds}:
            proc, ports[kind] = start_server(kind)
            procs.append(proc)
        trips: dict[str, Trip] = {}
        for kind in kinds:
            if kind == "butterfly_tcp":
                trips[kind] = await client_butterfly(ports[kind])
            elif kind == "asyncio_streams":
                trips[kind] = await client_asyncio(ports[kind])
            elif kind == "blocking_socket":
                trips[kind] = await client_blocking(ports[kind])
            elif kind == "pyzmq_req_rep":
                trips[kind] = await client_zmq(ports[kind])
            else:
                trips[kind] = await client_grpc(ports["grpc"], kind.endswith("streaming"))
        tensors = {name: torch.randn(shape) for name, shape in SHAPES.items()}
        samples: dict[tuple[str, str], list[float]] = {(k, n): [] for k in kinds for n in SHAPES}
        for kind in kinds:  # warm-up, and a check that every contender echoes faithfully
            for name, x in tensors.items():
                for _ in range(args.warmup):
                    y = await trips[kind](x)
                if not torch.equal(x, y):
                    raise RuntimeError(f"{kind} did not echo the {name} tensor")
        per_round = -(-args.trips // args.rounds)
        for _ in range(args.rounds):
            for kind in kinds:
                for name, x in tensors.items():
                    trip, out = trips[kind], samples[(kind, name)]
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        await trip(x)
                        out.append((time.perf_counter() - t0) * 1e6)
        results: dict[str, Any] = {}
        for (kind, name), s in samples.items():
            results.setdefault(kind, {})[name] = {**summary(s), "p99": pct(s, 0.99)}
        return results
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trips", type=int, default=2000, help="round trips per contender and size")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        torch.set_num_threads(1)
        SERVERS[args.serve]()
        return
    torch.set_num_threads(1)
    kinds = list(KINDS)
    try:
        import grpc  # noqa: F401

        kinds += GRPC_KINDS
        skipped = []
    except ImportError:
        skipped = GRPC_KINDS
    load_before = os.getloadavg()
    results = asyncio.run(measure(args, kinds))
    out = {
        "benchmark": "transport",
        "unit": "microseconds per round trip",
        "trips": args.trips,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "machine": machine(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
        "skipped": skipped,
        "ratio_to_blocking_socket": {
            kind: {
                name: round(r["median"] / results["blocking_socket"][name]["median"], 2)
                for name, r in res.items()
            }
            for kind, res in results.items()
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
