"""Chunked prefill benchmark: the gaps between the tokens of running streams while a long
prompt arrives, with the prompt sent whole and in chunks (generation.prefill_chunk).

Prints one JSON object. The data path is the running one (the gateway's pipeline engine
driving one stage server per stage, `butterfly.testing.pipeline.LocalPipeline`), here in
one process: four stages of the small demo model sharing one torch thread, so a stage
busy with the long prompt holds up every other step exactly as a node busy with it does,
and token times are read where the gateway samples them (no HTTP, no clock skew).

Each round runs, in an order that rotates between rounds: 8 streams decoding with no long
prompt (`none`), and 8 streams while a `--long`-token prompt arrives, sent whole
(`whole`) and in chunks of each `--chunks` size. A stream's gap is the time between two of
its tokens; the figure is the p95 of the gaps that overlap the window from the long
prompt's arrival to its first token (for `none`, the same window length as `whole`'s
from the same point of the streams). `ratio_to_none` is the target's measure;
`ratio_to_before` divides each run's figure by the p95 of its own streams' gaps in the
tokens just before the prompt arrived (decode gaps, after each stream's first token), a
reference measured under the same load, for a shared machine whose load drifts.

    python bench/prefill.py [--rounds 5] [--long 2000] [--chunks 32,128]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time
from typing import Any

import torch

from butterfly.partition.strategies import uniform_ranges
from butterfly.runtime.loader import num_layers
from butterfly.schedule.drafts import Speculation
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask
from common import bench_model, machine, summary

STREAMS = 8
STREAM_TOKENS = 480  # outlasts the window of chunks sized for a slow CPU (schedule.chunks)
STREAM_PROMPT = 16
WARM_TOKENS = 16  # tokens every stream has before the long prompt arrives


def p95(samples: list[float]) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


async def one_run(
    pipe: LocalPipeline, tag: str, long_prompt: list[int] | None, chunk: int, window_s: float
) -> dict[str, Any]:
    pipe.engine.retune_generation(speculation=Speculation(), prefill_chunk=chunk)
    load = os.getloadavg()[0]  # other work on the machine skews every figure
    gen = torch.Generator().manual_seed(len(tag))
    times: list[list[float]] = [[] for _ in range(STREAMS)]
    streams = []
    for s in range(STREAMS):
        ids = tuple(torch.randint(0, 256, (STREAM_PROMPT,), generator=gen).tolist())
        task = InferenceTask(RequestId(f"{tag}-s{s}"), ids, max_new_tokens=STREAM_TOKENS)
        stamp = times[s]
        streams.append(
            asyncio.create_task(pipe.run(task, lambda t, a=stamp: a.append(time.perf_counter())))
        )
    while min(len(t) for t in times) < WARM_TOKENS:
        await asyncio.sleep(0.005)
    arrived = time.perf_counter()
    done = arrived + window_s
    if long_prompt is not None:
        task = InferenceTask(RequestId(f"{tag}-long"), tuple(long_prompt), max_new_tokens=1)
        await pipe.run(task, lambda token: None)
        done = time.perf_counter()
    await asyncio.gather(*streams)
    if min(t[-1] for t in times) < done:
        raise RuntimeError("a stream ended inside the window: raise STREAM_TOKENS")
    gaps = [
        b - a for stamps in times for a, b in itertools.pairwise(stamps) if b > arrived and a < done
    ]
    # the same streams' gaps in the seconds just before: a reference taken under the
    # same load as the window, on a machine whose load drifts between runs
    before = [b - a for stamps in times for a, b in itertools.pairwise(stamps[1:]) if b <= arrived]
    return {
        "p95_gap_ms": p95(gaps) * 1000,
        "p95_gap_before_ms": p95(before) * 1000,
        "max_gap_ms": max(gaps) * 1000,
        "window_s": done - arrived,
        "load_average_1m": load,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = bench_model(args.size)
    ranges = uniform_ranges(num_layers(model_dir), args.stages)
    chunks = [int(c) for c in args.chunks.split(",")]
    long_prompt = torch.randint(0, 256, (args.long,), generator=torch.Generator().manual_seed(1))
    conditions = ["none", "whole", *(f"chunk_{c}" for c in chunks)]
    samples: dict[str, list[dict[str, Any]]] = {c: [] for c in conditions}
    async with LocalPipeline(model_dir, ranges) as pipe:
        await one_run(pipe, "warm", long_prompt.tolist(), 0, 0.0)
        for i in range(args.rounds):
            order = conditions[i % len(conditions) :] + conditions[: i % len(conditions)]
            window = 2.0
            for cond in order:
                tag = f"r{i}-{cond}"
                if cond == "none":
                    res = await one_run(pipe, tag, None, 0, window)
                else:
                    chunk = 0 if cond == "whole" else int(cond.removeprefix("chunk_"))
                    res = await one_run(pipe, tag, long_prompt.tolist(), chunk, 0.0)
                    if cond == "whole":
                        window = res["window_s"]
                samples[cond].append(res)
    none = summary([r["p95_gap_ms"] for r in samples["none"]])["median"]
    out: dict[str, Any] = {}
    for cond, runs in samples.items():
        gaps = [r["p95_gap_ms"] for r in runs]
        out[cond] = {
            "p95_gap_ms": summary(gaps),
            "max_gap_ms": summary([r["max_gap_ms"] for r in runs]),
            "long_prompt_first_token_s": summary([r["window_s"] for r in runs]),
            "load_average_1m": summary([r["load_average_1m"] for r in runs]),
            "ratio_to_none": round(summary(gaps)["median"] / none, 3),
            # each run's window against its own streams' gaps just before the prompt
            "ratio_to_before": summary([r["p95_gap_ms"] / r["p95_gap_before_ms"] for r in runs]),
            # per round, against that round's run with no long prompt
            "paired_ratio_to_none": summary(
                [
                    r["p95_gap_ms"] / n["p95_gap_ms"]
                    for r, n in zip(runs, samples["none"], strict=True)
                ]
            ),
        }
    return {
        "benchmark": "prefill",
        "model": f"demo-{args.size}",
        "stages": args.stages,
        "where": "one process: LocalPipeline, stage servers sharing one torch thread",
        "streams": STREAMS,
        "long_prompt_tokens": args.long,
        "rounds": args.rounds,
        "machine": machine(),
        "conditions": out,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", default="small")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--long", type=int, default=2000)
    ap.add_argument("--chunks", default="32,128")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
