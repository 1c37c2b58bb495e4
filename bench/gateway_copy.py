"""What it costs to keep an accepted task safe from the gateway's death, two ways.

In one process over the in-memory transport (n = 4, f = 1, gateways 0 and 1, the tiny
model), with the cluster up and idle:

- `direct_ms`: the acting gateway copies a task to the standby gateway and waits for its
  answer (the standby has written it to its SQLite store): `wiring.standby`'s path;
- `agreed_ms`: the acting gateway orders one command through PBFT and waits until it has
  executed it (2f+1 commits), as a task would if it went through the agreed log.

Prints one JSON object: medians with spread, and the ratio agreed / direct.

    python bench/gateway_copy.py [--samples 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from butterfly.control.plans import plan_command
from butterfly.runtime.demo import create_demo
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.commands import encode_command
from common import machine, summary


async def measure(samples: int, root: Path) -> dict[str, object]:
    model = create_demo(root / "tiny", "tiny", seed=0)
    settings = {"coordination.heartbeat_interval_ms": 10, "cluster.gateways": [0, 1]}
    async with InProcessCluster(model, 4, root / "cluster", f=1, settings=settings) as c:
        gw = c.nodes[0].gateway
        assert gw is not None
        await c.until(lambda: gw.scheduler is not None, "node 0 serving")
        plan = c.nodes[0].stage_server.plan
        assert plan is not None
        # an agreed command of an epoch decided already: ordered and executed, then skipped
        command = encode_command(plan_command(plan))
        direct, agreed = [], []
        for i in range(samples):
            task = InferenceTask(RequestId(f"bench-{i}"), input_ids=tuple(range(64)))
            started = time.perf_counter()
            await gw.replicas.accepted(task)
            direct.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await c.nodes[0].agreement.propose(command, 10.0)
            agreed.append((time.perf_counter() - started) * 1000)
        assert gw.replicas.copies == samples
        d, a = summary(direct), summary(agreed)
        return {
            "bench": "gateway_copy",
            "direct_ms": d,
            "agreed_ms": a,
            "agreed_over_direct": round(float(a["median"]) / float(d["median"]), 2),
            "machine": machine(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(asyncio.run(measure(args.samples, Path(d)))))


if __name__ == "__main__":
    main()
