"""Soak: steady mixed load on a 4-node small-model cluster, every node's RSS sampled.

Reports, per node, the slope of its resident memory over time (least squares, MB per
minute) over the whole run and after a warm-up, with the requests completed and failed.
The target: at most 1 MB/min per node. Load: `--clients` concurrent clients, each
sending requests of mixed prompt lengths (8 to 200 tokens) and lengths of generation
(4 to 64 tokens), a quarter of them streamed.

    python bench/soak.py [--minutes 10] [--clients 4] [--size small] [--warmup-min 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from butterfly.cli.launcher import LocalCluster, free_ports, node_configs
from common import bench_model, machine

SAMPLE_S = 5.0


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def code_mappings(pid: int) -> tuple[int, float] | None:
    """Anonymous writable-executable mappings of `pid` (JIT-compiled kernel code, oneDNN's
    and MKL's) and their size in MB: the growth the soak found in the chain nodes."""
    count, size = 0, 0
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) == 5 and fields[1] == "rwxp":  # no path: anonymous
            start, end = (int(a, 16) for a in fields[0].split("-"))
            count, size = count + 1, size + end - start
    return count, round(size / 2**20, 1)


def slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(m for _, m in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mx) * (m - my) for t, m in points)
    return round(cov / var * 60, 3)


async def client(
    url: str, model: str, stop: float, rng: random.Random, counts: dict[str, int]
) -> None:
    async with httpx.AsyncClient(timeout=300, follow_redirects=True) as http:
        while time.monotonic() < stop:
            ids = [rng.randrange(5, 250) for _ in range(rng.randrange(8, 200))]
            body: dict[str, Any] = {"input_ids": ids, "max_new_tokens": rng.randrange(4, 64)}
            try:
                if rng.random() < 0.25:
                    async with http.stream(
                        "POST",
                        f"{url}/v1/completions",
                        json={**_openai(body, model), "stream": True},
                    ) as r:
                        async for _ in r.aiter_lines():
                            pass
                        ok = r.status_code == 200
                else:
                    r = await http.post(f"{url}/inference", json={**body, "wait": True})
                    ok = r.status_code == 200 and r.json().get("status") == "completed"
            except httpx.HTTPError:
                ok = False
            counts["completed" if ok else "failed"] += 1


def _openai(body: dict[str, Any], model: str) -> dict[str, Any]:
    return {"model": model, "prompt": body["input_ids"], "max_tokens": body["max_new_tokens"]}


async def sample(
    pids: list[int],
    stop: float,
    out: list[list[tuple[float, float]]],
    code: list[list[tuple[float, int, float]]],
    loads: list[float],
) -> None:
    t0 = time.monotonic()
    while time.monotonic() < stop:
        now = time.monotonic() - t0
        loads.append(os.getloadavg()[0])
        for i, pid in enumerate(pids):
            mb = rss_mb(pid)
            if mb is not None:
                out[i].append((now, mb))
            mapped = code_mappings(pid)
            if mapped is not None:
                code[i].append((now, *mapped))
        await asyncio.sleep(SAMPLE_S)


async def load(url: str, pids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    stop = time.monotonic() + args.minutes * 60
    counts = {"completed": 0, "failed": 0}
    points: list[list[tuple[float, float]]] = [[] for _ in pids]
    code: list[list[tuple[float, int, float]]] = [[] for _ in pids]
    loads: list[float] = []
    rngs = [random.Random(args.seed + i) for i in range(args.clients)]
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
    clients = (client(url, model, stop, r, counts) for r in rngs)
    await asyncio.gather(sample(pids, stop, points, code, loads), *clients)
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:
        health = (await http.get(f"{url}/health")).json()  # the plan: who computed what
    warm = args.warmup_min * 60
    nodes = {}
    for i, pts in enumerate(points):
        nodes[str(i)] = {
            "rss_mb_first": round(pts[0][1], 1) if pts else None,
            "rss_mb_last": round(pts[-1][1], 1) if pts else None,
            "slope_mb_per_min": slope_mb_per_min(pts),
            "slope_mb_per_min_after_warmup": slope_mb_per_min([p for p in pts if p[0] >= warm]),
            "samples": len(pts),
            # RSS at the first sample of every minute: does the growth level off?
            "rss_mb_by_minute": [
                round(next(m for t, m in pts if t >= minute * 60), 1)
                for minute in range(int(pts[-1][0] // 60) + 1)
            ]
            if pts
            else [],
            # anonymous rwx mappings (JIT kernel code): count and MB, at the first sample,
            # at the end of the warm-up and at the last
            "code_mappings": [
                list(c[1:])
                for c in (code[i][:1] + [c for c in code[i] if c[0] >= warm][:1] + code[i][-1:])
            ],
        }
    loads.sort()
    spread = [loads[0], loads[len(loads) // 2], loads[-1]] if loads else []
    return {
        "requests": counts,
        "load_average_1min_min_median_max": [round(x, 1) for x in spread],
        "plan": health.get("plan"),
        "layers": {str(n["id"]): n["layers"] for n in health.get("nodes", [])},
        "nodes": nodes,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--size", default="small")
    ap.add_argument("--warmup-min", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--f", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="section.key=JSON value")
    args = ap.parse_args()
    settings = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    model = bench_model(args.size)
    with tempfile.TemporaryDirectory() as work:
        port = free_ports(1)[0]
        configs = node_configs(
            nodes=4, f=args.f, model=model, api_port=port, data_dir=Path(work), settings=settings
        )
        cluster = LocalCluster(configs, f"http://127.0.0.1:{port}", Path(work))
        try:
            cluster.start()
            cluster.wait_ready(300)
            # the acting gateway: on a loaded machine a standby may have taken over already
            url = cluster.acting_url()
            result = asyncio.run(load(url, [p.pid for p in cluster.procs], args))
        finally:
            cluster.stop()
    slopes = [
        n["slope_mb_per_min_after_warmup"]
        for n in result["nodes"].values()
        if n["slope_mb_per_min_after_warmup"] is not None
    ]
    print(
        json.dumps(
            {
                "benchmark": "soak",
                "machine": machine(),
                "model": f"demo-{args.size}",
                "minutes": args.minutes,
                "clients": args.clients,
                "f": args.f,
                "settings": settings,
                **result,
                "max_slope_mb_per_min_after_warmup": max(slopes) if slopes else None,
                "target_at_most_1_mb_per_min": bool(slopes) and max(slopes) <= 1.0,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
