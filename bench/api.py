"""API throughput benchmark: short requests on the tiny model through the HTTP gateway.

Prints one JSON object: requests/s and latency percentiles for `--requests` requests sent
by `--concurrency` clients against a local cluster of `--nodes` processes. Every request
waits for its result (`wait: true`), so latency is the full request, queue included.

    python bench/api.py [--nodes 4] [--requests 2000] [--concurrency 32] [--new-tokens 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from butterfly.cluster.launcher import LocalCluster, free_ports, node_configs
from common import bench_model, machine, summary


async def load(url: str, requests: int, concurrency: int, new_tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[int, int] = {}
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                body = {"prompt": f"request {i}", "max_new_tokens": new_tokens, "wait": True}
                t0 = time.perf_counter()
                r = await client.post(f"{url}/inference", json=body)
                latencies.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = summary(latencies)
    s = sorted(latencies)
    lat["p95"] = round(s[int(0.95 * (len(s) - 1))], 3)
    lat["p99"] = round(s[int(0.99 * (len(s) - 1))], 3)
    return {
        "requests_per_s": round(requests / wall, 1),
        "seconds": round(wall, 2),
        "latency_ms": lat,
        "errors": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = bench_model("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_ports(1)[0]
        settings = {
            "scheduling.dispatch_batch_size": args.concurrency,
            "scheduling.max_queue": 10 * args.concurrency,
        }
        cfgs = node_configs(
            nodes=args.nodes, f=0, model=model, api_port=port, data_dir=Path(tmp), settings=settings
        )
        cluster = LocalCluster(cfgs, f"http://127.0.0.1:{port}", Path(tmp))
        try:
            cluster.start()
            cluster.wait_ready(300)
            asyncio.run(load(cluster.api_url, 100, args.concurrency, args.new_tokens))  # warm-up
            runs = [
                asyncio.run(load(cluster.api_url, args.requests, args.concurrency, args.new_tokens))
                for _ in range(args.repeats)
            ]
        finally:
            cluster.stop()
    rps = [r["requests_per_s"] for r in runs]
    p95 = [r["latency_ms"]["p95"] for r in runs]
    print(
        json.dumps(
            {
                "benchmark": "api",
                "model": "demo-tiny",
                "nodes": args.nodes,
                "requests": args.requests,
                "concurrency": args.concurrency,
                "new_tokens": args.new_tokens,
                "machine": machine(),
                "requests_per_s": summary(rps),
                "p95_latency_ms": summary(p95),
                "runs": runs,
                "targets": {"requests_per_s": 300, "p95_ms": 100},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
