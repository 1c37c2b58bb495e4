"""Chaos, long form: many seeded fault trials on real node processes, one JSON object.

Each trial is a fresh 4-node cluster (5 nodes at f = 0 for two kills: a quorum is a
majority, protocol.quorum) with requests in flight when one fault strikes
(`butterfly.testing.chaos`: stage kill, two kills, kill and restart, freeze, the acting
gateway killed, or killed and restarted, whole-cluster restart). Reports lost, wrong and
failed tasks (the target is 0 of each), the recovery time users see (from the fault to a
fresh one-token answer) per fault kind and overall, how long a SIGTERMed cluster takes
to exit (target 5 s), and the seeds of any broken trial.

    python bench/chaos.py [--trials 50] [--seed 0] [--size tiny] [--new-tokens 48]
        [--faults restart_all,...]  (a subset, cycled through; all by default)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.chaos import FAULTS, Outcome, run_trial
from common import bench_model, machine, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help="comma-separated faults to cycle through (restart_all alone: shutdown times)",
    )
    args = ap.parse_args()
    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or not faults:
        ap.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    model = bench_model(args.size)
    codec = TextCodec.load(model)
    stage = load_stage(model)

    @cache
    def reference(prompt: str, new: int) -> list[int]:
        return list(generate([stage], codec.encode(prompt), new, stop_ids=codec.eos_ids))

    outcomes: list[Outcome] = []
    started = time.monotonic()
    for seed in range(args.seed, args.seed + args.trials):
        with tempfile.TemporaryDirectory() as work:
            outcomes.append(
                run_trial(
                    seed, model, Path(work), reference, new_tokens=args.new_tokens, faults=faults
                )
            )
    by_fault: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_fault[o.fault].append(o)

    def figures(group: list[Outcome]) -> dict[str, Any]:
        times = [o.recovery_s for o in group if o.recovery_s is not None]
        return {
            "trials": len(group),
            "tasks": sum(o.tasks for o in group),
            "lost": sum(o.lost for o in group),
            "wrong": sum(o.wrong for o in group),
            "failed": sum(o.failed for o in group),
            "recovery_s": summary(times) if times else None,
        }

    broken = [o for o in outcomes if not o.ok]
    stops = [o.shutdown_s for o in outcomes if o.shutdown_s is not None]
    print(
        json.dumps(
            {
                "benchmark": "chaos",
                "machine": machine(),
                "model": f"demo-{args.size}",
                "new_tokens": args.new_tokens,
                "seed": args.seed,
                "faults": list(faults),
                **figures(outcomes),
                "per_fault": {f: figures(by_fault[f]) for f in FAULTS if f in by_fault},
                "whole_cluster_shutdown_s": summary(stops) if stops else None,
                "broken_trials": [
                    {"seed": o.seed, "fault": o.fault, "nodes": o.nodes, "errors": o.errors[:3]}
                    for o in broken
                ],
                "wall_s": round(time.monotonic() - started, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
