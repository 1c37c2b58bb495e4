"""What the identity handshake costs: time to open a TcpTransport connection on loopback.

    python bench/handshake.py [--connects 500] [--rounds 4]

Prints one JSON object: milliseconds per connection through the full handshake (both
node keys proven, net.handshake) and, as the reference measured in the same run, a bare
TCP connect plus one frame each way (what the handshake's round trip would cost with no
proof at all), and the ratio of the medians. The handshake runs once per peer and
channel; frames after it cost nothing extra. Rounds interleave the two, so load on the
machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from butterfly.metrics.events import discard
from butterfly.net.framing import LENGTH, Envelope, encode_frame
from butterfly.net.tcp import Identity, TcpTransport
from butterfly.protocol.sign import SigningKey
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.data import Ping
from common import machine, summary

KEYS = [SigningKey.from_seed(bytes([i + 1]) * 32) for i in range(2)]
PUBLIC = {NodeId(i): k.public for i, k in enumerate(KEYS)}


def transport(node: int) -> TcpTransport:
    return TcpTransport(
        identity=Identity(NodeId(node), "bench", "m", key=KEYS[node], keys=PUBLIC),
        listen=("127.0.0.1", 0),
        peers={NodeId(0): ("127.0.0.1", 0), NodeId(1): ("127.0.0.1", 0)},
        emit=discard,
        epoch=lambda: Epoch(1),
    )


async def handshakes(a: TcpTransport, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        conn = await a._connect(NodeId(1), "data")  # one fresh connection, no cache
        out.append((time.perf_counter() - t) * 1e3)
        conn.close("measured")
        await conn.wait_closed()
    return out


async def bare(port: int, n: int) -> list[float]:
    frame = encode_frame(Envelope(Ping(1), NodeId(0), Epoch(1), "bench"))
    out = []
    for _ in range(n):
        t = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(frame)
        (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
        await reader.readexactly(length)
        out.append((time.perf_counter() - t) * 1e3)
        writer.close()
        await writer.wait_closed()
    return out


async def echo_server() -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
        writer.write(LENGTH.pack(length) + await reader.readexactly(length))
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def measure(connects: int, rounds: int) -> dict[str, object]:
    async def ignore(peer: NodeId, env: Envelope) -> None:
        return None

    a, b = transport(0), transport(1)
    await a.start(ignore)
    await b.start(ignore)
    a.peers[NodeId(1)] = b.address
    server = await echo_server()
    port = int(server.sockets[0].getsockname()[1])
    with_proof: list[float] = []
    reference: list[float] = []
    try:
        for _ in range(rounds):
            with_proof += await handshakes(a, connects)
            reference += await bare(port, connects)
    finally:
        server.close()
        await a.close()
        await b.close()
    return {
        "bench": "handshake",
        "connect_ms": summary(with_proof),
        "reference_bare_connect_one_frame_each_way_ms": summary(reference),
        "ratio_of_medians": round(statistics.median(with_proof) / statistics.median(reference), 2),
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--connects", type=int, default=500, help="connections per round and kind")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(measure(args.connects, args.rounds))))


if __name__ == "__main__":
    main()
