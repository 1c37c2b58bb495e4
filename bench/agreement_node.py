"""One PBFT replica in its own process, over TCP: the unit of `bench/protocol.py`'s
4-process commit latency (no model, no membership: the agreement path alone, exactly as
a node runs it: `AgreementDriver` on `TcpTransport`'s control channel).

Replica 0 is the client: once every peer answers it times `--requests` commands one
after another (request to local execution, which needs 2f+1 commits) and prints one
JSON object. The others run until SIGTERM.

    python bench/agreement_node.py --replica I --ports P0,P1,P2,P3 [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from butterfly.agreement.driver import AgreementDriver
from butterfly.metrics.events import discard
from butterfly.net.framing import Envelope
from butterfly.net.tcp import Identity, TcpTransport
from butterfly.protocol.pbft_state import PbftConfig
from butterfly.protocol.sign import SigningKey
from butterfly.types.ids import NodeId
from butterfly.types.wire.control import AgreementFrame
from butterfly.types.wire.frames import Message
from common import summary

F = 1


async def serve(replica: int, ports: list[int], requests: int) -> dict[str, object] | None:
    keys = [SigningKey.from_seed(bytes([i + 1]) * 32) for i in range(len(ports))]
    publics = tuple(k.public for k in keys)
    transport = TcpTransport(
        identity=Identity(
            NodeId(replica),
            "bench",
            "bench",
            key=keys[replica],
            keys={NodeId(i): k for i, k in enumerate(publics)},
        ),
        listen=("127.0.0.1", ports[replica]),
        peers={NodeId(i): ("127.0.0.1", p) for i, p in enumerate(ports)},
        emit=discard,
        epoch=lambda: 0,
    )
    config = PbftConfig(
        replica=NodeId(replica),
        keys=publics,
        f=F,
        clients={NodeId(i): k for i, k in enumerate(publics)},
        checkpoint_interval=128,
        window=256,
    )
    driver = AgreementDriver(config=config, key=keys[replica], transport=transport)

    async def handle(peer: NodeId, env: Envelope) -> tuple[Message, bytes] | None:
        if isinstance(env.msg, AgreementFrame):
            await driver.on_frame(env)
        return None

    await transport.start(handle)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    runner = asyncio.create_task(driver.run())
    result = None
    try:
        if replica == 0:
            await driver.propose(b"warm-up", timeout=60.0)  # every peer is up and connected
            for k in range(10):
                await driver.propose(b"warm-up %d" % k, timeout=10.0)
            samples = []
            for k in range(requests):
                t0 = time.perf_counter()
                await driver.propose(b"command %d" % k, timeout=10.0)
                samples.append((time.perf_counter() - t0) * 1000)
            result = {"commit_ms": summary(samples), "requests": requests}
        else:
            await stop.wait()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await transport.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replica", type=int, required=True)
    ap.add_argument("--ports", required=True)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    sys.setswitchinterval(0.0005)  # as `butterfly.node.run` sets it
    result = asyncio.run(
        serve(args.replica, [int(p) for p in args.ports.split(",")], args.requests)
    )
    if result is not None:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
