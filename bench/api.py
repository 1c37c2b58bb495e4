"""API throughput benchmark: short requests on the tiny model through the HTTP gateway.

Prints one JSON object: requests/s and latency percentiles for `--requests` requests sent
by `--concurrency` clients against a local cluster of `--nodes` processes. Every request
is a full HTTP/1.1 `POST /inference` with `wait: true` that returns only with the finished
result (checked: status 200 and `"status": "completed"`), so latency is the whole
request, queue included.

    python bench/api.py [--nodes 4] [--requests 1000] [--concurrency 24] [--new-tokens 4]

Why these choices:

- Concurrency 24. By Little's law the requests in flight are throughput times latency:
  400 requests/s with a mean latency of ~60 ms (p95 then stays well under 100 ms) is 24
  in flight. Measured on the Intel Xeon (2026-12-04, `api-concurrency-*.json`): 16
  clients left the cluster idle part of each round (367 requests/s, p95 54 ms), 20 gave
  389, 24 gave 406 (p95 70 ms), 28 gave 418 (p95 80 ms), and 32 fell to 277 with p95
  138 ms (queueing, the batches no larger). More clients than the pipeline batches
  only queue and lengthen every latency. The batcher takes up to `--concurrency` steps
  at once (`scheduling.dispatch_batch_size`).
- The client is raw HTTP/1.1 over one keep-alive connection per client, not httpx: the
  client shares the machine's two cores with the four node processes, and httpx spent
  11 ms of CPU per request (measured), more than the whole cluster's budget at 300/s
  (2 cores / 300 = 6.7 ms); this client spends ~0.3 ms.
- `api.rate_limit = 0`: the per-client limiter keys on the client's address, and all 16
  clients are 127.0.0.1; its default (100/s) would cap the benchmark at a third of the
  target.
- `resources.threads = 1`: four node processes share two cores, each running one layer of
  a 64-wide model; torch's intra-op threads only contend (per-request CPU of the stage
  nodes halved with one thread, measured in the same session).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from butterfly.cli.launcher import LocalCluster, free_ports, node_configs
from common import bench_model, machine, summary


async def _post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, body: bytes
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a keep-alive connection: (status, body)."""
    writer.write(
        b"POST /inference HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
    )
    status = int((await reader.readuntil(b"\r\n")).split(b" ", 2)[1])
    length, chunked = 0, False
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readexactly(2)
    return status, b"".join(parts)


async def load(url: str, requests: int, concurrency: int, new_tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(requests))
    host = url.split("//", 1)[1].rstrip("/")
    address, port = host.rsplit(":", 1)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(address, int(port))
        try:
            for i in counter:
                body = {"prompt": f"request {i}", "max_new_tokens": new_tokens, "wait": True}
                data = json.dumps(body).encode()
                t0 = time.perf_counter()
                status, answer = await _post(reader, writer, host, data)
                latencies.append((time.perf_counter() - t0) * 1000)
                if status != 200 or json.loads(answer).get("status") != "completed":
                    errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            writer.close()

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


def cpu_seconds(pids: list[int]) -> list[float]:
    """User + system CPU seconds of each process so far (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / tick)  # utime, stime
    return out


def measured(url: str, pids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """One run, with each node's CPU per request: on a shared 2-core machine the rate
    follows the other work, while the CPU a request costs the cluster does much less."""
    before = cpu_seconds(pids)
    run = asyncio.run(load(url, args.requests, args.concurrency, args.new_tokens))
    spent = [b - a for a, b in zip(before, cpu_seconds(pids), strict=True)]
    run["cpu_ms_per_request"] = [round(s * 1000 / args.requests, 3) for s in spent]
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per node (0 = all)")
    args = ap.parse_args()
    model = bench_model("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_ports(1)[0]
        settings = {
            "scheduling.dispatch_batch_size": args.concurrency,
            "scheduling.max_queue": 10 * args.concurrency,
            "resources.threads": args.threads,
            # every client is 127.0.0.1, one rate-limit bucket (default 100/s, burst 200):
            # left on, any run above 100 requests/s ends in 429s, whatever the cluster does
            "api.rate_limit": 0,
        }
        cfgs = node_configs(
            nodes=args.nodes, f=0, model=model, api_port=port, data_dir=Path(tmp), settings=settings
        )
        cluster = LocalCluster(cfgs, f"http://127.0.0.1:{port}", Path(tmp))
        try:
            cluster.start()
            cluster.wait_ready(300)
            with urllib.request.urlopen(f"{cluster.api_url}/health", timeout=10) as r:
                stages = [n["layers"] for n in json.load(r)["nodes"] if n["layers"] is not None]
            asyncio.run(load(cluster.api_url, 100, args.concurrency, args.new_tokens))  # warm-up
            load_before = os.getloadavg()[0]
            pids = [p.pid for p in cluster.procs]
            runs = [measured(cluster.api_url, pids, args) for _ in range(args.repeats)]
            load_after = os.getloadavg()[0]
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
                "torch_threads_per_node": args.threads,
                "machine": machine(),
                # the plan is decided from facts measured at start-up; it may use fewer nodes
                "stages": stages,
                # other work on the machine: 1-minute load average around the measured runs
                "load_average": [round(load_before, 2), round(load_after, 2)],
                "requests_per_s": summary(rps),
                "p95_latency_ms": summary(p95),
                "cpu_ms_per_request_all_nodes": summary(
                    [sum(r["cpu_ms_per_request"]) for r in runs]
                ),
                "runs": runs,
                "targets": {"requests_per_s": 400, "p95_ms": 100},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
