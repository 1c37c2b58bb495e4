"""What a prompt's chunk adds to a stage's step of decode rows, run apart or packed.

Prints one JSON object. One stage of the small demo model (3 of its 12 layers, the
middle of a 4-stage split) takes a step of `--rows` decode rows (each request at position
100) beside a chunk of a long prompt, at positions spread over a 2,000-token prompt
(attention over the growing context counts). Three ways, interleaved in each round:
`decode` (the decode rows alone), `apart` (the decode rows as one batch, then the chunk
as a forward of its own: how a stage ran such a step before) and `packed` (one forward
over all rows, `runtime.stage.forward_packed`). The figure is the time `apart` and
`packed` add to `decode`.

Timed on one torch thread in that thread's CPU time (`time.thread_time`), so other work
on a shared machine changes the figures little; `--threads 2` times wall time on two.

    python bench/prefill_step.py [--chunks 16,32,64,128] [--rows 4] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from butterfly.runtime.loader import load_stage, num_layers
from butterfly.runtime.stage import forward_packed, forward_rows
from butterfly.types.model import LayerRange
from common import bench_model, machine, summary

DECODE_AT = 100
PROMPT = 2000


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    clock: Callable[[], float] = time.thread_time if args.threads == 1 else time.perf_counter
    model = bench_model(args.size)
    layers = num_layers(model)
    stage = load_stage(model, LayerRange(layers // 4, layers // 2))
    width = int(stage.args.dim)  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()[0]
    out: dict[str, Any] = {}
    with torch.inference_mode():
        caches = [stage.new_cache() for _ in range(args.rows)]
        for cache in caches:
            forward_rows(stage, torch.randn(1, DECODE_AT, width, generator=gen), [cache], [0])
        rows = torch.randn(args.rows, 1, width, generator=gen)
        for chunk in (int(c) for c in args.chunks.split(",")):
            ms: dict[str, list[float]] = {"decode": [], "apart": [], "packed": []}
            x = torch.randn(1, chunk, width, generator=gen)
            for at in range(0, PROMPT - chunk, PROMPT // 4):
                long = stage.new_cache()
                if at:
                    forward_rows(stage, torch.randn(1, at, width, generator=gen), [long], [0])
                for _ in range(args.rounds):
                    for way, times in ms.items():
                        for cache in caches:
                            cache.truncate(DECODE_AT)
                        assert long is not None
                        long.truncate(at)
                        started = clock()
                        if way != "packed":
                            forward_rows(stage, rows, caches, [DECODE_AT] * args.rows)
                        if way == "apart":
                            forward_rows(stage, x, [long], [at])
                        if way == "packed":
                            forward_packed(
                                stage,
                                torch.cat([rows.reshape(1, args.rows, width), x], dim=1),
                                [*caches, long],
                                [DECODE_AT] * args.rows + [at],
                                [1] * args.rows + [chunk],
                            )
                        times.append((clock() - started) * 1000)
            decode = statistics.median(ms["decode"])
            out[f"chunk_{chunk}"] = {
                "ms": {way: summary(times) for way, times in ms.items()},
                "added_ms_apart": round(statistics.median(ms["apart"]) - decode, 2),
                "added_ms_packed": round(statistics.median(ms["packed"]) - decode, 2),
            }
    return {
        "benchmark": "prefill_step",
        "model": f"demo-{args.size}",
        "layers": f"[{layers // 4}, {layers // 2})",
        "decode_rows": args.rows,
        "threads": args.threads,
        "clock": "thread CPU time" if args.threads == 1 else "wall",
        "load_average_1m": {"before": round(load_before, 2), "after": os.getloadavg()[0]},
        "machine": machine(),
        "chunks": out,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--chunks", default="16,32,64,128")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
