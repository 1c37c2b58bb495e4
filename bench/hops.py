"""Per-hop cost: the tiny model's per-token decode time over 1, 2 and 4 node processes.

The tiny model's compute is negligible, so what grows with the number of nodes is the
path of a frame between them: arrival, decoding, the hand-off to the torch thread, the
result's encoding and signing, and the send. All clusters run at once and every round
asks each of them in turn (the order rotates), so they see the same machine state;
`per_hop_ms` is the least-squares slope of per-token time over the node count of the
clusters of 2 nodes or more, and `paired_per_hop_ms` the same slope per round (both left
out when fewer than two such sizes are run, for an A/B of one size alone). A ring of
n >= 2 nodes runs n stage steps over n links (the gateway's own stage is a direct
call), so each node added to it adds one step and one link: the hop. One node runs one
step over no link, so 1 -> 2 nodes adds two links; the slope over all sizes counted them
as one, and put the twenty-third session's 0.30 ms per hop at 0.34 (a review).
`slope_all_sizes_ms` keeps that older figure beside it; `times_ms` holds every sample.

With `--baseline-src DIR` the same clusters also run on the code under DIR (another
checkout's src/), interleaved with these, so a change's effect is measured in one run.
With `--control-src DIR` as well (a second checkout of the baseline's commit), a third
set runs the baseline's code again: `per_token_ratio_control_to_baseline` is what the
machine alone moved the ratio by in the same run. On the 2-core AMD EPYC, 4 tiny nodes
of one unchanged hop path gave 0.87-1.41x the baseline between runs, and the baseline's
second copy 0.95-1.12x and once 1.37x it: a cluster instance sets its own speed, not
only the moment (docs/PERFORMANCE-LOG.md, sixteenth session). So `--instances N` runs
the whole set N times over, each on fresh node processes, `--rounds` rounds each; every
figure pools all of them, and `median_per_instance_ms` shows each instance's own.

    python bench/hops.py [--rounds 15] [--instances 1] [--sizes 1,2,4] [--size tiny]
        [--link-latency-ms 0]
        [--baseline-src /path/to/other/src [--control-src /path/to/its/copy/src]]
        [--dtype float32] [--quantization none] [--f 0 --verification audit]

`--f 1 --sizes 4 --verification none` times the steps' signed records and the gateway's
signed dispatches (protocol.dispatch) without the audits' re-execution beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

from butterfly.cli.launcher import LocalCluster, free_port_block, node_configs
from butterfly.net.framing import Envelope, decode_frame, encode_frame
from butterfly.runtime.loader import load_stage
from butterfly.runtime.stage import forward_rows
from butterfly.runtime.torch_thread import TorchThread, confine_to_one_thread
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.testing.latency import LatencyProxies, delay_cluster
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.wire.data import StageStep
from common import bench_model, machine, rotated, summary

NEW = 32
PROMPT = 16


@contextlib.contextmanager
def cluster(
    model_dir: Path,
    nodes: int,
    latency_ms: float = 0.0,
    settings: dict[str, Any] | None = None,
    pythonpath: str | None = None,
    f: int = 0,
) -> Iterator[LocalCluster]:
    """A loopback cluster of `nodes` processes, with `latency_ms` added to every link.

    The split is uniform: the default planner weighs link latency and, with links
    delayed, puts the model on fewer nodes, so "4 nodes" would not mean 4 stages.
    `pythonpath`: the node processes run the code there (an A/B against another
    checkout in the same run); the children inherit it from this process's environment."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port_block(4)
        cfgs = node_configs(
            nodes=nodes,
            f=f,
            model=model_dir,
            api_port=port,
            data_dir=Path(tmp),
            settings={"partition.strategy": "uniform", **(settings or {})},
        )
        proxies: LatencyProxies | None = None
        if latency_ms > 0:
            proxies = delay_cluster(cfgs, latency_ms / 1000)
        c = LocalCluster(cfgs, f"http://127.0.0.1:{port}", Path(tmp))
        try:
            saved = os.environ.get("PYTHONPATH")
            if pythonpath is not None:
                os.environ["PYTHONPATH"] = pythonpath
            try:
                c.start()
            finally:
                if saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
            try:
                c.wait_ready(300)
            except (RuntimeError, TimeoutError):
                for log in sorted(Path(tmp).glob("node-*.log")):  # before the directory goes
                    print(
                        f"--- {log.name}",
                        *log.read_text().splitlines()[-15:],
                        sep="\n",
                        file=sys.stderr,
                    )
                raise
            yield c
        finally:
            c.stop()
            if proxies is not None:
                proxies.close()


def decode_ms(url: str, prompt: list[int], new: int = NEW) -> tuple[float, list[int]]:
    """The gateway's own per-token decode time (first token to last) and the tokens."""
    body = {"input_ids": prompt, "max_new_tokens": new, "wait": True}
    r = httpx.post(f"{url}/inference", json=body, timeout=600, follow_redirects=True)
    r.raise_for_status()
    res = r.json()
    return res["timings"]["time_per_output_token_s"] * 1000, res["output_ids"]


def components(model_dir: Path, samples: int = 2000) -> dict[str, float]:
    """Median microseconds of each piece of one hop's path, in this process, with the
    tiny model's activation for one token (what a decode step carries between stages):
    the frame and tensor codecs, the hand-off to the torch thread and back, and a middle
    stage's forward inline and on the worker. What a hop costs beyond their sum is the
    operating system's: socket writes and the next process's wake-up."""

    def med(fn: Any, n: int = samples) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1e6, 1)

    confine_to_one_thread()  # as a node's event loop thread is (runtime.torch_thread)
    stage = load_stage(model_dir, LayerRange(1, 2))
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    x = torch.randn(1, 1, hidden)
    payload = encode_tensor(x)
    msg = StageStep(
        (RequestId("r1"),), (5,), (20,), (1,), (NodeId(2), NodeId(3)), NodeId(0), True, (), ()
    )
    frame = encode_frame(Envelope(msg, NodeId(1), 3, "local", 0, False, payload))
    cache = stage.new_cache()

    def forward() -> None:
        if cache.length > 400:
            cache.truncate(0)
        with torch.inference_mode():
            forward_rows(stage, x, [cache], [cache.length], last_only=True, trace=None)

    out = {
        "decode_frame_us": med(lambda: decode_frame(frame[4:], 1 << 20)),
        "decode_tensor_us": med(lambda: decode_tensor(payload)),
        "encode_tensor_us": med(lambda: encode_tensor(x)),
        "encode_frame_us": med(
            lambda: encode_frame(Envelope(msg, NodeId(1), 3, "local", 0, False, payload))
        ),
        "forward_inline_us": med(forward, samples // 4),
    }
    worker = TorchThread()

    async def handoffs() -> tuple[float, float]:
        async def timed(fn: Any) -> float:
            times = []
            for _ in range(samples // 4):
                t0 = time.perf_counter()
                await worker.run(fn)
                times.append(time.perf_counter() - t0)
            return round(statistics.median(times) * 1e6, 1)

        return await timed(lambda: None), await timed(forward)

    try:
        out["torch_thread_handoff_us"], out["forward_on_worker_us"] = asyncio.run(handoffs())
    finally:
        worker.close()
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def instance_medians(samples: list[float], per_instance: int) -> list[float]:
    """The median of each instance's run of `per_instance` samples, in order."""
    runs = [samples[i : i + per_instance] for i in range(0, len(samples), per_instance)]
    return [round(statistics.median(run), 4) for run in runs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15, help="per instance")
    ap.add_argument(
        "--instances",
        type=int,
        default=1,
        help="fresh sets of clusters, one after another: a cluster instance sets its own speed",
    )
    ap.add_argument("--sizes", default="1,2,4")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--link-latency-ms", type=float, default=0.0)
    ap.add_argument(
        "--baseline-src", default=None, help="also run clusters on the code in this src/ dir"
    )
    ap.add_argument(
        "--control-src", default=None, help="with --baseline-src: a copy of its code, run again"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantization", default="none", choices=["none", "int8"])
    ap.add_argument(
        "--f",
        type=int,
        default=0,
        help="liars tolerated: from 1, every range on f+1 nodes and every step signed, "
        "checked and dispatched (n >= 3f+1: --sizes 4 for f = 1)",
    )
    ap.add_argument("--verification", default="audit", choices=["audit", "replicate", "none"])
    args = ap.parse_args()
    if args.control_src and not args.baseline_src:
        ap.error("--control-src is a second copy of --baseline-src's code: give both")
    precision = {"model.dtype": args.dtype, "model.quantization": args.quantization}
    precision["byzantine.verification"] = args.verification
    sizes = [int(s) for s in args.sizes.split(",")]
    versions = {"this": None} | ({"baseline": args.baseline_src} if args.baseline_src else {})
    if args.control_src:
        versions["control"] = args.control_src
    model_dir = bench_model(args.size)
    prompt = torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    keys = [(v, n) for v in versions for n in sizes]
    times: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    same = True
    for instance in range(args.instances):  # fresh node processes for every version each time
        with contextlib.ExitStack() as stack:
            clusters = {
                (v, n): stack.enter_context(
                    cluster(
                        model_dir,
                        n,
                        args.link_latency_ms,
                        precision,
                        pythonpath=versions[v],
                        f=args.f,
                    )
                )
                for v, n in keys
            }
            for c in clusters.values():  # warm-up
                decode_ms(c.api_url, prompt)
            for r in range(instance * args.rounds, (instance + 1) * args.rounds):
                outs = []
                for k in rotated(keys, r):
                    ms, out = decode_ms(clusters[k].api_url, prompt)
                    times[k].append(ms)
                    outs.append(out)
                same = same and all(o == outs[0] for o in outs)
    rounds = args.rounds * args.instances
    xs = [float(n) for n in sizes]
    per_version: dict[str, Any] = {}
    for v in versions:
        medians = [statistics.median(times[(v, n)]) for n in sizes]
        per_version[v] = {
            "src": versions[v] or str(Path(__file__).resolve().parents[1] / "src"),
            "decode_ms_per_token": {str(n): summary(times[(v, n)]) for n in sizes},
            "median_per_instance_ms": {
                str(n): instance_medians(times[(v, n)], args.rounds) for n in sizes
            },
        }
        per_version[v]["times_ms"] = {str(n): [round(t, 4) for t in times[(v, n)]] for n in sizes}
        if len(set(sizes)) > 1:
            per_version[v]["slope_all_sizes_ms"] = round(slope(xs, medians), 4)
        ring = [i for i, n in enumerate(sizes) if n >= 2]
        if len({sizes[i] for i in ring}) > 1:  # one size (an A/B of one size) has no slope
            rx = [xs[i] for i in ring]
            paired = [slope(rx, [times[(v, sizes[i])][r] for i in ring]) for r in range(rounds)]
            per_version[v]["per_hop_ms"] = round(slope(rx, [medians[i] for i in ring]), 4)
            per_version[v]["paired_per_hop_ms"] = summary(paired)
    result = {
        "benchmark": "hops",
        "model": f"demo-{args.size}",
        "precision": precision,
        "f": args.f,
        "new_tokens": NEW,
        "rounds": args.rounds,
        "instances": args.instances,
        "link_latency_ms": args.link_latency_ms,
        "machine": machine(),
        "versions": per_version,
        "same_tokens_everywhere": same,
    }
    # in this process, after the clusters are gone (the same machine, less busy)
    result["hop_components_us"] = components(model_dir)
    for v in ("this", "control"):
        if v in per_version and "baseline" in per_version:
            result[f"per_token_ratio_{v}_to_baseline"] = {
                str(n): summary(
                    [a / b for a, b in zip(times[(v, n)], times[("baseline", n)], strict=True)]
                )
                for n in sizes
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
