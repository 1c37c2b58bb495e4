"""Pipeline throughput under load: aggregate tokens/s at 1, 4, 8 and 16 concurrent
requests on 4 nodes, with and without added link latency.

Two clusters of the same model run at once, one with every link delayed by
`--link-latency-ms` (butterfly.testing.latency) and one without; each round runs every
concurrency on both, alternating which goes first, so `ratio_latency_to_none` (per round,
delayed over plain) compares the two under the same machine state. A request's tokens
count from its first; the wall time is from sending the first request to the last answer.
Every request of the largest concurrency runs at once (`scheduling.dispatch_batch_size`):
with the default of 10, 16 requests ran as 10 and then 6, two micro-batches of five in
flight where four of four hide the links (0.77x against 0.88x, AMD EPYC, 2026-12-05).

With `--baseline-src DIR` two more clusters run the code under DIR (another checkout's
src/), in the same rotation, for `ratio_to_baseline_*`.

    python bench/load.py [--rounds 3] [--size small] [--link-latency-ms 5]
        [--concurrency 1,4,8,16] [--baseline-src /path/to/other/src]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import torch

from common import bench_model, machine, summary
from hops import cluster

PROMPT = 16


async def tokens_per_s(url: str, prompts: list[list[int]], new: int) -> tuple[float, int]:
    """Aggregate tokens/s of `prompts` sent at once, and the tokens generated."""
    async with httpx.AsyncClient(timeout=600, follow_redirects=True) as client:

        async def one(p: list[int]) -> int:
            body = {"input_ids": p, "max_new_tokens": new, "wait": True}
            r = await client.post(f"{url}/inference", json=body)
            while r.status_code == 202:  # the gateway's wait ran out: ask for the result
                task = r.json()["task_id"]
                r = await client.get(f"{url}/result/{task}", params={"wait": 60})
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text[:500]}")
            return len(r.json()["output_ids"])

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    return sum(counts) / wall, sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="small")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--link-latency-ms", type=float, default=5.0)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument(
        "--baseline-src", default=None, help="also run both clusters on the code in this src/"
    )
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    model_dir = bench_model(args.size)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (PROMPT,), generator=gen).tolist() for _ in range(max(levels))]
    variants: dict[str, tuple[float, str | None]] = {
        "none": (0.0, None),
        "latency": (args.link_latency_ms, None),
    }
    if args.baseline_src:
        variants |= {
            "baseline_none": (0.0, args.baseline_src),
            "baseline_latency": (args.link_latency_ms, args.baseline_src),
        }
    # every request of the largest level runs at once (see the module's docstring)
    running = {"scheduling.dispatch_batch_size": max(levels)}
    rates: dict[str, dict[int, list[float]]] = {v: {c: [] for c in levels} for v in variants}
    with contextlib.ExitStack() as stack:
        clusters = {
            v: stack.enter_context(
                cluster(model_dir, args.nodes, ms, settings=running, pythonpath=src)
            )
            for v, (ms, src) in variants.items()
        }
        for c in clusters.values():  # warm-up, at the largest batch too
            asyncio.run(tokens_per_s(c.api_url, prompts[:1], 4))
            asyncio.run(tokens_per_s(c.api_url, prompts, 4))
        for r in range(args.rounds):
            for level in levels:
                names = list(variants)
                turn = (r + level) % len(names)  # the order rotates
                order = names[turn:] + names[:turn]
                for v in order:
                    rate, _ = asyncio.run(
                        tokens_per_s(clusters[v].api_url, prompts[:level], args.new_tokens)
                    )
                    rates[v][level].append(rate)
    result: dict[str, Any] = {
        "benchmark": "load",
        "model": f"demo-{args.size}",
        "nodes": args.nodes,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "link_latency_ms": args.link_latency_ms,
        "machine": machine(),
        "tokens_per_s": {
            v: {str(c): summary(rs) for c, rs in per.items()} for v, per in rates.items()
        },
    }

    def ratio(a: str, b: str) -> dict[str, Any]:
        return {
            str(c): summary([x / y for x, y in zip(rates[a][c], rates[b][c], strict=True)])
            for c in levels
        }

    result["ratio_latency_to_none"] = ratio("latency", "none")
    if args.baseline_src:
        result["baseline_src"] = args.baseline_src
        result["baseline_ratio_latency_to_none"] = ratio("baseline_latency", "baseline_none")
        result["ratio_to_baseline_none"] = ratio("none", "baseline_none")
        result["ratio_to_baseline_latency"] = ratio("latency", "baseline_latency")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
