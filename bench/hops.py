"""Per-hop cost: the tiny model's per-token decode time over 1, 2 and 4 node processes.

The tiny model's compute is negligible, so what grows with the number of nodes is the
path of a frame between them: arrival, decoding, the hand-off to the torch thread, the
result's encoding and signing, and the send. All clusters run at once and every round
asks each of them in turn (the order rotates), so they see the same machine state;
`per_hop_ms` is the least-squares slope of per-token time over the node count (the
ring through n nodes has n links), and `paired_per_hop_ms` the same slope per round.

    python bench/hops.py [--rounds 15] [--sizes 1,2,4] [--size tiny] [--link-latency-ms 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

from butterfly.cli.launcher import LocalCluster, free_port_block, node_configs
from butterfly.testing.latency import LatencyProxies, delay_cluster
from common import bench_model, machine, summary

NEW = 32
PROMPT = 16


@contextlib.contextmanager
def cluster(
    model_dir: Path, nodes: int, latency_ms: float = 0.0, settings: dict[str, Any] | None = None
) -> Iterator[LocalCluster]:
    """A loopback cluster of `nodes` processes, with `latency_ms` added to every link."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port_block(4)
        cfgs = node_configs(
            nodes=nodes,
            f=0,
            model=model_dir,
            api_port=port,
            data_dir=Path(tmp),
            settings=settings,
        )
        proxies: LatencyProxies | None = None
        if latency_ms > 0:
            proxies = delay_cluster(cfgs, latency_ms / 1000)
        c = LocalCluster(cfgs, f"http://127.0.0.1:{port}", Path(tmp))
        try:
            c.start()
            c.wait_ready(300)
            yield c
        finally:
            c.stop()
            if proxies is not None:
                proxies.close()


def decode_ms(url: str, prompt: list[int], new: int = NEW) -> tuple[float, list[int]]:
    """The gateway's own per-token decode time (first token to last) and the tokens."""
    body = {"input_ids": prompt, "max_new_tokens": new, "wait": True}
    r = httpx.post(f"{url}/inference", json=body, timeout=600)
    r.raise_for_status()
    res = r.json()
    return res["timings"]["time_per_output_token_s"] * 1000, res["output_ids"]


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sizes", default="1,2,4")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--link-latency-ms", type=float, default=0.0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    model_dir = bench_model(args.size)
    prompt = torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    times: dict[int, list[float]] = {n: [] for n in sizes}
    same = True
    with contextlib.ExitStack() as stack:
        clusters = {
            n: stack.enter_context(cluster(model_dir, n, args.link_latency_ms)) for n in sizes
        }
        for c in clusters.values():  # warm-up
            decode_ms(c.api_url, prompt)
        for r in range(args.rounds):
            outs = []
            order = sizes[r % len(sizes) :] + sizes[: r % len(sizes)]
            for n in order:
                ms, out = decode_ms(clusters[n].api_url, prompt)
                times[n].append(ms)
                outs.append(out)
            same = same and all(o == outs[0] for o in outs)
    medians = {n: statistics.median(t) for n, t in times.items()}
    xs = [float(n) for n in sizes]
    paired = [slope(xs, [times[n][r] for n in sizes]) for r in range(args.rounds)]
    result = {
        "benchmark": "hops",
        "model": f"demo-{args.size}",
        "new_tokens": NEW,
        "rounds": args.rounds,
        "link_latency_ms": args.link_latency_ms,
        "machine": machine(),
        "decode_ms_per_token": {str(n): summary(t) for n, t in times.items()},
        "per_hop_ms": round(slope([float(n) for n in sizes], [medians[n] for n in sizes]), 4),
        "paired_per_hop_ms": summary(paired),
        "same_tokens_at_every_size": same,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
